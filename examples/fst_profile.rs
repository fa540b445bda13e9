#[path = "../benches/common/mod.rs"]
mod common;
use std::sync::Arc;
use std::time::Instant;
use rcptgate::directory::{self, Directory, LookupOptions, Snapshot};
fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let syn = common::generate(n, 7);
    let qs = common::hits(&syn, 1_000_000, 1, false);
    let (bytes, _) = directory::build(syn.input).unwrap();
    let dir = Directory::new(LookupOptions::default());
    dir.publish(Arc::new(Snapshot::from_bytes(bytes).unwrap()));
    let mut hot = String::with_capacity(256);
    for round in 0..3 {
        let t = Instant::now();
        let mut ok = 0;
        for q in &qs { hot.clear(); hot.push_str(q); if matches!(dir.lookup(std::hint::black_box(&hot)), rcptgate::Verdict::Accept(_)) { ok += 1; } }
        println!("round {round}: {:.0} ns/lookup ({ok})", t.elapsed().as_nanos() as f64 / qs.len() as f64);
    }
}
