//! What the directory lifecycle adds to a rebuild: `lifecycle::plan` (the streaming pass that
//! compares the snapshot in service with the new build, counts removals for the deletion
//! guard and adds tombstone records), against the build itself.
//!
//! `cargo bench --bench lifecycle` (1M addresses, 1 % removed; set RCPTGATE_BENCH_SIZES to
//! change); under `cargo test` it runs once on 10k addresses.

mod common;

use std::time::Instant;

use rcptgate::config::GuardConfig;
use rcptgate::directory::{Kind, Snapshot};
use rcptgate::sync::lifecycle::{self, State};

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = match std::env::var("RCPTGATE_BENCH_SIZES") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) if bench => vec![1_000_000],
        Err(_) => vec![10_000],
    };
    let guard = GuardConfig::default();
    for n in sizes {
        let old_input = common::generate(n, 42).input;
        let t = Instant::now();
        let (bytes, _) = rcptgate::internal::build(old_input).expect("build");
        let first_build = t.elapsed().as_secs_f64();
        let old = Snapshot::from_bytes(bytes).expect("load");

        // The next sync: the same directory with every 100th address gone.
        let mut input = common::generate(n, 42).input;
        let mut i = 0;
        input.records.retain(|_| {
            i += 1;
            i % 100 != 0
        });
        input.generation = 2;
        let t = Instant::now();
        let plan = lifecycle::plan(Some(&old), &mut input, &State::default(), 1, &guard, false);
        let plan_time = t.elapsed().as_secs_f64();
        assert_eq!(plan.removed as usize, n / 100);
        assert_eq!(plan.tombstones as usize, n / 100);
        assert_eq!(plan.hold, plan.removed > guard.max_deletions);
        assert_eq!(plan.added, 0);
        let t = Instant::now();
        let (bytes, _) = rcptgate::internal::build(input).expect("build");
        let second_build = t.elapsed().as_secs_f64();
        let new = Snapshot::from_bytes(bytes).expect("load");
        let mut tombstones = 0;
        new.for_each_address(|_, h| tombstones += usize::from(h.kind == Kind::Tombstone));
        assert_eq!(tombstones, n / 100);

        // The sync after: the tombstones are in force (state) and in service.
        let mut input = common::generate(n, 42).input;
        let mut i = 0;
        input.records.retain(|_| {
            i += 1;
            i % 100 != 0
        });
        let t = Instant::now();
        let again = lifecycle::plan(Some(&new), &mut input, &plan.state, 2, &guard, false);
        let steady = t.elapsed().as_secs_f64();
        assert_eq!((again.removed, again.tombstones as usize), (0, n / 100));
        println!(
            "\n=== lifecycle plan, {n} addresses ===\n\
first build {first_build:.2} s; next sync with 1 % removed: plan {plan_time:.3} s \
({} removed, {} tombstoned, held: {}) + build {second_build:.2} s; \
steady state with {} tombstones in force: plan {steady:.3} s",
            plan.removed, plan.tombstoned, plan.hold, again.tombstones
        );
    }
}
