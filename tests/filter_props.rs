//! Property tests for the miss filter checked before the FST walk: it may only say "surely
//! absent", so every stored address, and every subaddress of one, is still found; exceptions
//! still reject; and what is not stored is answered as before (unknown, or the catch-all of
//! an accept-all domain). Builds of one to three FST shards, with the filter keyed by domain
//! name (every build's) and by domain index (earlier builds' format, still read).

use std::collections::HashSet;

use proptest::prelude::*;
use rcptgate::address::AddrBuf;
use rcptgate::directory::{Kind, LookupOptions, Match, Reject, Snapshot, Verdict};
use rcptgate::internal::{BuildInput, DomainSpec, Interner, Keying, NONE, RecordSpec, build};

fn local() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_-]{1,6}(\\.[a-z0-9_-]{1,6}){0,2}",
        "[a-zäöüßéçñø]{1,8}",
        "(user|info|sales)[0-9]{1,4}",
        "[A-Z][a-zA-Z]{0,5}",
    ]
}

/// The key stored for `local` in domain `d`: as it is in a keep-case domain (domain 0 when
/// `keep_case`), else lowercased (what the lookup folds queries to; ASCII in these cases).
fn stored_key(d: usize, local: &str, keep_case: bool) -> String {
    if keep_case && d == 0 {
        local.to_owned()
    } else {
        local.to_ascii_lowercase()
    }
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

/// Domain `i`'s name: short, or longer than the 38 bytes a domain's entry holds (a lookup
/// then compares it with the string table).
fn domain(i: usize) -> String {
    match i % 3 {
        0 => format!("d{i}.example"),
        1 => format!("d{i}.subsidiary-holding-co.example"),
        _ => format!("d{i}.a-very-long-subsidiary-name.holding.example"),
    }
}

fn snapshot(
    nd: usize,
    records: &[(usize, String, bool)],
    accept_all: bool,
    keep_case: bool,
    shards: usize,
    filter_keying: Keying,
) -> Snapshot {
    let mut seen = HashSet::new();
    let records = records
        .iter()
        .map(|(d, l, exc)| (*d, stored_key(*d, l, keep_case), *exc))
        .filter(|(d, l, _)| seen.insert((*d, l.clone())))
        .map(|(d, l, exc)| {
            let kind = if exc { Kind::Exception } else { Kind::User };
            RecordSpec::new(d as u32, l.as_str(), kind)
        })
        .collect();
    let input = BuildInput {
        generation: 1,
        strings: Interner::default(),
        domains: (0..nd)
            .map(|i| DomainSpec {
                name: domain(i),
                customer: NONE,
                profile: NONE,
                route: NONE,
                // The last domain takes every local part when asked.
                accept_all: accept_all && i == nd - 1,
                keep_case: keep_case && i == 0,
            })
            .collect(),
        records,
        shards,
        filter_keying,
        ..BuildInput::default()
    };
    let (bytes, _) = build(input).expect("build");
    let snap = Snapshot::from_bytes(bytes).expect("open");
    // The filter passed its check at open: it is used (a block without keys has none).
    if !seen.is_empty() {
        assert!(snap.miss_filters() > 0, "no miss filter in use");
    }
    snap
}

fn keying() -> impl Strategy<Value = Keying> {
    prop_oneof![Just(Keying::Name), Just(Keying::Index)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_filter_never_turns_a_hit_into_a_miss(
        (nd, records, probes) in case(),
        accept_all in any::<bool>(),
        keep_case in any::<bool>(),
        shards in 1usize..4,
        keying in keying(),
    ) {
        let snap = std::sync::Arc::new(snapshot(nd, &records, accept_all, keep_case, shards, keying));
        // The same snapshot as the one segment of a set: its lookups go through the set's
        // handle of it (its filter, domain table and FST read through the handle; several
        // shards and filters keyed by index through the segment).
        let set = Snapshot::assemble(vec![snap.clone()], 7, 0).expect("set");
        let opts = LookupOptions::default();
        let mut buf = AddrBuf::default();
        let mut stored = std::collections::HashMap::new();
        for (d, l, exc) in &records {
            stored.entry((*d, stored_key(*d, l, keep_case))).or_insert(*exc);
        }
        for snap in [&*snap, &set] {
            for ((d, l), exc) in &stored {
                let addr = format!("{l}@{}", domain(*d));
                let tagged = format!("{l}+tag@{}", domain(*d));
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
                let probe = format!("{l}@{}", domain(*d));
                let v = snap.lookup(&probe, &opts, &mut buf);
                match stored.get(&(*d, stored_key(*d, l, keep_case))) {
                    Some(true) => prop_assert!(matches!(v, Verdict::Reject(Reject::Exception)), "{probe}: {v:?}"),
                    Some(false) => prop_assert!(matches!(v, Verdict::Accept(_)), "{probe}: {v:?}"),
                    None if l.eq_ignore_ascii_case("postmaster") => prop_assert!(matches!(v, Verdict::Accept(_))),
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
}
