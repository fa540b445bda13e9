//! Property tests for address normalization (DESIGN.md §3): normalization is idempotent, and
//! equivalent spellings of one mailbox give one key.

use proptest::prelude::*;
use rcptgate::address::{normalize, normalize_domain};

fn local_atom() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,10}"
}

fn dot_atom() -> impl Strategy<Value = String> {
    prop::collection::vec(local_atom(), 1..4).prop_map(|v| v.join("."))
}

fn label() -> impl Strategy<Value = String> {
    // A valid label: "xn--" would make it an A-label, which must also decode (IDNA).
    "[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?".prop_filter("an A-label prefix", |l| {
        !l.to_ascii_lowercase().starts_with("xn--")
    })
}

fn domain() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(label(), 1..4),
        prop::sample::select(vec!["com", "de", "example", "co.uk"]),
    )
        .prop_map(|(v, tld)| format!("{}.{tld}", v.join(".")))
}

fn unicode_local() -> impl Strategy<Value = String> {
    "[a-zäöüßéèçñøåæœÄÖÜÉ]{1,12}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn normalization_is_idempotent(s in "\\PC{0,80}") {
        if let Ok(n) = normalize(&s) {
            prop_assert_eq!(normalize(&n), Ok(n.clone()));
        }
    }

    #[test]
    fn idempotent_on_plausible_addresses(l in dot_atom(), d in domain()) {
        let n = normalize(&format!("{l}@{d}")).expect("valid");
        prop_assert_eq!(normalize(&n), Ok(n.clone()));
    }

    #[test]
    fn equivalent_spellings_meet(l in dot_atom(), d in domain()) {
        let key = normalize(&format!("{l}@{d}")).expect("valid");
        let spellings = [
            format!("<{l}@{d}>"),
            format!("  {}@{}  ", l.to_uppercase(), d.to_uppercase()),
            format!("{l}@{d}."),
            format!("\"{l}\"@{d}"),
            format!("<@relay.example:{l}@{d}>"),
            format!("{}@{}", l.to_lowercase(), d.to_lowercase()),
        ];
        for s in &spellings {
            prop_assert_eq!(normalize(s), Ok(key.clone()), "spelling {:?}", s);
        }
    }

    #[test]
    fn unicode_labels_and_a_labels_meet(l in unicode_local(), u in "[a-zäöüé]{1,10}", tld in "(de|com)") {
        let d = format!("{u}.{tld}");
        let Ok(a) = normalize_domain(&d) else { return Ok(()); };
        let via_u = normalize(&format!("{l}@{d}"));
        let via_a = normalize(&format!("{l}@{}", a.to_uppercase()));
        prop_assert_eq!(via_u.clone(), via_a);
        // NFD input meets the NFC key.
        let nfd: String = unicode_normalization::UnicodeNormalization::nfd(l.as_str()).collect();
        prop_assert_eq!(normalize(&format!("{nfd}@{d}")), via_u);
    }
}
