use std::time::Instant;
fn main() {
    let mut buf = rcptgate::address::AddrBuf::default();
    let qs: Vec<String> = (0..1000).map(|i| format!("james.smith{i}@northblue-{i}.com")).collect();
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0;
        for _ in 0..1000 { for q in &qs { if rcptgate::address::parse(std::hint::black_box(q), &mut buf).is_ok() { n += 1; } } }
        println!("parse: {:.1} ns/op ({n})", t.elapsed().as_nanos() as f64 / 1e6);
        let t = Instant::now();
        let mut m = std::collections::HashMap::new();
        for q in &qs { m.insert(q.clone().into_boxed_str(), 1u32); }
        let mut n = 0;
        for _ in 0..1000 { for q in &qs { if m.get(std::hint::black_box(q.as_str())).is_some() { n += 1; } } }
        println!("hash get: {:.1} ns/op ({n})", t.elapsed().as_nanos() as f64 / 1e6);
    }
}
