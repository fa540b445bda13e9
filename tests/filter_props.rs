//! Property tests for the miss filter checked before the FST walk: it may only say "surely
//! absent", so every stored address, and every subaddress of one, is still found; exceptions
//! still reject; and what is not stored is answered as before (unknown, or the catch-all of
//! an accept-all domain).

use std::collections::HashSet;

use proptest::prelude::*;
use rcptgate::address::AddrBuf;
use rcptgate::directory::{Kind, LookupOptions, Match, Reject, Snapshot, Verdict};
use rcptgate::internal::{BuildInput, DomainSpec, Interner, NONE, RecordSpec, build};

fn local() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_-]{1,6}(\\.[a-z0-9_-]{1,6}){0,2}",
        "[a-zäöüßéçñø]{1,8}",
        "(user|info|sales)[0-9]{1,4}",
    ]
}

/// (domain count, records as (domain, local, is exception), probes as (domain, local)).
type Case = (usize, Vec<(usize, String, bool)>, Vec<(usize, String)>);

fn case() -> impl Strategy<Value = Case> {
    (1usize..5).prop_flat_map(|nd| {
        (
            Just(nd),
            prop::collection::vec((0..nd, local(), prop::bool::weighted(0.05)), 0..400),
            prop::collection::vec((0..nd, local()), 0..200),
        )
    })
}

fn snapshot(nd: usize, records: &[(usize, String, bool)], accept_all: bool) -> Snapshot {
    let mut seen = HashSet::new();
    let records = records
        .iter()
        .filter(|(d, l, _)| seen.insert((*d, l.clone())))
        .map(|(d, l, exc)| {
            let kind = if *exc { Kind::Exception } else { Kind::User };
            RecordSpec::new(*d as u32, l.as_str(), kind)
        })
        .collect();
    let input = BuildInput {
        generation: 1,
        strings: Interner::default(),
        domains: (0..nd)
            .map(|i| DomainSpec {
                name: format!("d{i}.example"),
                customer: NONE,
                profile: NONE,
                route: NONE,
                // The last domain takes every local part when asked.
                accept_all: accept_all && i == nd - 1,
                keep_case: false,
            })
            .collect(),
        records,
        ..BuildInput::default()
    };
    let (bytes, _) = build(input).expect("build");
    Snapshot::from_bytes(bytes).expect("open")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_filter_never_turns_a_hit_into_a_miss((nd, records, probes) in case(), accept_all in any::<bool>()) {
        let snap = snapshot(nd, &records, accept_all);
        let opts = LookupOptions::default();
        let mut buf = AddrBuf::default();
        let mut stored = std::collections::HashMap::new();
        for (d, l, exc) in &records {
            stored.entry((*d, l.clone())).or_insert(*exc);
        }
        for ((d, l), exc) in &stored {
            let addr = format!("{l}@d{d}.example");
            let tagged = format!("{l}+tag@d{d}.example");
            for (probe, subaddress) in [(&addr, false), (&tagged, true)] {
                match snap.lookup(probe, &opts, &mut buf) {
                    Verdict::Reject(Reject::Exception) if *exc => {}
                    // A tagged probe finds the tagged key itself when that is stored too.
                    Verdict::Accept(h) if !exc => prop_assert!(
                        h.matched == Match::Exact
                            || (subaddress && h.matched == Match::Subaddress),
                        "{probe}: {h:?}"
                    ),
                    other => prop_assert!(false, "{probe}: {other:?}"),
                }
            }
        }
        for (d, l) in &probes {
            let probe = format!("{l}@d{d}.example");
            let v = snap.lookup(&probe, &opts, &mut buf);
            match stored.get(&(*d, l.clone())) {
                Some(true) => prop_assert!(matches!(v, Verdict::Reject(Reject::Exception)), "{probe}: {v:?}"),
                Some(false) => prop_assert!(matches!(v, Verdict::Accept(_)), "{probe}: {v:?}"),
                None if l == "postmaster" => prop_assert!(matches!(v, Verdict::Accept(_))),
                None if accept_all && *d == nd - 1 => prop_assert!(
                    matches!(&v, Verdict::Accept(h) if h.matched == Match::AcceptAll),
                    "{probe}: {v:?}"
                ),
                None => prop_assert!(
                    matches!(v, Verdict::Reject(Reject::UnknownUser)),
                    "{probe}: {v:?}"
                ),
            }
        }
    }
}
