//! Deterministic synthetic directories for the benchmarks: N addresses over N/500 domains
//! (skewed: a few large tenants, many small ones), two thirds primary addresses of users,
//! groups and shared mailboxes, one third aliases; a quarter of the users routed to the cloud.

#![allow(dead_code)]

use std::hint::black_box;
use std::time::Instant;

use rcptgate::directory::Kind;
use rcptgate::internal::{BuildInput, DomainSpec, Interner, NONE, RecordSpec};

const FIRST: &[&str] = &[
    "james",
    "mary",
    "robert",
    "patricia",
    "john",
    "jennifer",
    "michael",
    "linda",
    "david",
    "elizabeth",
    "william",
    "barbara",
    "richard",
    "susan",
    "joseph",
    "jessica",
    "thomas",
    "sarah",
    "charles",
    "karen",
    "lukas",
    "anna",
    "felix",
    "lea",
    "jonas",
    "hannah",
    "leon",
    "sophie",
    "paul",
    "marie",
    "finn",
    "emma",
    "noah",
    "mia",
    "elias",
    "lina",
    "ben",
    "emilia",
    "louis",
    "clara",
    "hugo",
    "jade",
    "gabriel",
    "louise",
    "arthur",
    "alice",
    "raphael",
    "chloe",
    "jules",
    "ines",
    "mohammed",
    "fatima",
    "wei",
    "li",
    "hiroshi",
    "yuki",
    "carlos",
    "lucia",
    "mateo",
    "sofia",
    "olga",
    "ivan",
    "priya",
    "arjun",
    "ahmet",
    "elif",
    "jan",
    "agnieszka",
    "lars",
    "ingrid",
];
const LAST: &[&str] = &[
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "thomas",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "mueller",
    "schmidt",
    "schneider",
    "fischer",
    "weber",
    "meyer",
    "wagner",
    "becker",
    "schulz",
    "hoffmann",
    "bernard",
    "dubois",
    "durand",
    "lefebvre",
    "moreau",
    "laurent",
    "simon",
    "michel",
    "rossi",
    "russo",
    "ferrari",
    "esposito",
    "bianchi",
    "romano",
    "kowalski",
    "nowak",
    "wisniewski",
    "novak",
    "svoboda",
    "nielsen",
    "jensen",
    "hansen",
    "johansson",
    "larsson",
    "kim",
    "lee",
    "park",
    "chen",
    "wang",
    "zhang",
    "tanaka",
    "suzuki",
    "sato",
    "yilmaz",
    "kaya",
    "silva",
    "santos",
    "oliveira",
    "ivanov",
    "petrov",
];
const WORDS: &[&str] = &[
    "north", "blue", "river", "stone", "alpha", "nova", "green", "bright", "summit", "oak",
    "harbor", "metro", "apex", "cedar", "delta", "eagle", "falcon", "global", "iron", "lake",
];
const TLDS: &[&str] = &[
    "com", "de", "net", "org", "co.uk", "fr", "nl", "ch", "at", "io",
];
const ROLES: &[&str] = &[
    "info", "sales", "support", "billing", "hr", "jobs", "office", "team", "news", "press",
];

/// splitmix64: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Synthetic {
    pub input: BuildInput,
    /// Every address as `local@domain` (normalized), in generation order.
    pub addresses: Vec<String>,
}

fn pick<'a>(rng: &mut Rng, list: &[&'a str]) -> &'a str {
    list[rng.below(list.len())]
}

pub fn domain_name(i: usize) -> String {
    let mut rng = Rng::new(0xD0_0000 + i as u64);
    format!(
        "{}{}-{i}.{}",
        pick(&mut rng, WORDS),
        pick(&mut rng, WORDS),
        pick(&mut rng, TLDS)
    )
}

/// Generate `n` addresses (exactly), deterministically for a given `seed`.
pub fn generate(n: usize, seed: u64) -> Synthetic {
    let mut rng = Rng::new(seed);
    let ndomains = (n / 500).max(2);
    let mut strings = Interner::default();
    let onprem = strings.intern("smtp:[mx.onprem.example]:25");
    let cloud = strings.intern("smtp:[tenant.mail.protection.outlook.com]:25");
    let standard = strings.intern("standard");
    let domains: Vec<DomainSpec> = (0..ndomains)
        .map(|i| DomainSpec {
            name: domain_name(i),
            customer: strings.intern(&format!("{}", 10000 + i / 3)),
            profile: standard,
            route: onprem,
            accept_all: false,
            keep_case: false,
        })
        .collect();
    let mut seen = std::collections::HashSet::with_capacity(n * 2);
    let mut records = Vec::with_capacity(n);
    let mut addresses = Vec::with_capacity(n);
    let mut counter = 0u64;
    while records.len() < n {
        // Skewed domain choice: u^2 favours low indices (large tenants).
        let u = rng.unit();
        let d = ((u * u) * ndomains as f64) as usize % ndomains;
        let (first, last) = (pick(&mut rng, FIRST), pick(&mut rng, LAST));
        counter += 1;
        let roll = rng.below(100);
        let (local, kind) = if roll < 4 {
            (
                format!("{}{}", pick(&mut rng, ROLES), counter % 97),
                Kind::Group,
            )
        } else if roll < 6 {
            (
                format!("{}-desk{}", pick(&mut rng, ROLES), counter % 89),
                Kind::Shared,
            )
        } else if rng.below(4) == 0 {
            (format!("{first}.{last}{}", counter % 1000), Kind::User)
        } else {
            (format!("{first}.{last}"), Kind::User)
        };
        if !seen.insert((d, local.clone())) {
            continue;
        }
        let dname = &domains[d].name;
        let primary = format!("{local}@{dname}");
        let mut rec = RecordSpec::new(d as u32, local.as_str(), kind);
        let routed = kind == Kind::User && rng.below(4) == 0;
        if routed {
            rec.route = cloud;
        }
        rec.source = 0;
        rec.line = records.len() as u32 + 1;
        records.push(rec);
        addresses.push(primary.clone());
        // Half of the primaries get one alias: one third of all addresses.
        if records.len() < n && rng.below(2) == 0 {
            let alias = match rng.below(3) {
                0 => format!("{}{last}", &first[..1]),
                1 => format!("{first}_{last}"),
                _ => format!("{last}.{first}"),
            };
            if seen.insert((d, alias.clone())) {
                let mut a = RecordSpec::new(d as u32, alias.as_str(), Kind::Alias);
                if routed {
                    a.route = cloud;
                }
                a.owner = Some(primary.into());
                a.line = records.len() as u32 + 1;
                records.push(a);
                addresses.push(format!("{alias}@{dname}"));
            }
        }
    }
    let _ = NONE;
    // What a directory sync leaves out: every 50th address a disabled account's (as an AD
    // sync with include_disabled = false would), for `explain` and the section's size.
    let excluded: Vec<rcptgate::directory::explain::Excluded> = addresses
        .iter()
        .step_by(50)
        .map(|a| rcptgate::directory::explain::Excluded {
            address: format!("x.{a}"),
            reason: rcptgate::directory::explain::Reason::Disabled,
            origin: "synthetic.ldap (CN=Disabled User,OU=Staff,DC=corp,DC=example)".into(),
            detail: "userAccountControl has ACCOUNTDISABLE".into(),
        })
        .collect();
    Synthetic {
        input: BuildInput {
            generation: 1,
            created_unix: 0,
            strings,
            sources: vec!["synthetic.map".into()],
            domains,
            records,
            shards: 0,
            filter_keying: Default::default(),
            excluded,
        },
        addresses,
    }
}

/// Addresses in the generated domains that do not exist.
pub fn misses(syn: &Synthetic, count: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let a = &syn.addresses[rng.below(syn.addresses.len())];
            let (local, domain) = a.rsplit_once('@').unwrap_or((a, ""));
            format!("{local}.x{}@{domain}", rng.below(1000))
        })
        .collect()
}

/// Random existing addresses (hits), optionally with a `+tag` detail.
pub fn hits(syn: &Synthetic, count: usize, seed: u64, tag: bool) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let a = &syn.addresses[rng.below(syn.addresses.len())];
            if tag {
                let (local, domain) = a.rsplit_once('@').unwrap_or((a, ""));
                format!("{local}+news{}@{domain}", rng.below(100))
            } else {
                a.clone()
            }
        })
        .collect()
}

/// `items` in a random order (Fisher-Yates, from `seed`).
pub fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    let mut out = items.to_vec();
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i + 1));
    }
    out
}

// Timing of single lookups, shared by the lookup and segments benchmarks.

pub fn percentiles(mut ns: Vec<f64>) -> (f64, f64) {
    ns.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
    (at(0.50), at(0.99))
}

/// Median cost of the timing itself (two `Instant::now` calls).
pub fn timer_overhead() -> f64 {
    let mut v: Vec<f64> = (0..100_000)
        .map(|_| {
            let t = Instant::now();
            black_box(());
            t.elapsed().as_nanos() as f64
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Time each query on its own. The query is first copied into a reused buffer, outside the
/// timed region: a server has the address it just received in cache, while the directory
/// data it needs is wherever a random lookup finds it.
pub fn time_each(queries: &[String], overhead: f64, mut f: impl FnMut(&str)) -> (f64, f64) {
    for q in queries.iter().take(1000) {
        f(q);
    }
    let mut hot = String::with_capacity(512);
    let ns: Vec<f64> = queries
        .iter()
        .map(|q| {
            hot.clear();
            hot.push_str(q);
            let t = Instant::now();
            f(black_box(&hot));
            (t.elapsed().as_nanos() as f64 - overhead).max(0.0)
        })
        .collect();
    percentiles(ns)
}

/// The machine's floor for a random lookup in `bytes` of memory: nanoseconds per dependent
/// read (each read's address comes from the one before, as a lookup's chain of reads does),
/// over one random cycle through every 64-byte line of an anonymous mapping in transparent
/// huge pages, as the snapshots' hot sections are. Reported beside the lookups it bounds.
pub fn dependent_read_ns(bytes: usize, hops: usize) -> f64 {
    const LINE: usize = 64;
    let lines = (bytes / LINE).max(2);
    let Ok(mut mem) = memmap2::MmapOptions::new().len(lines * LINE).map_anon() else {
        return f64::NAN;
    };
    let _ = mem.advise(memmap2::Advice::HugePage);
    // All lines in a random order (Fisher-Yates), each pointing to the next and the last to
    // the first: one cycle through every line.
    let mut order: Vec<u64> = (0..lines as u64).collect();
    let mut rng = Rng::new(0xF100);
    for i in (1..lines).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for (w, &from) in order.iter().enumerate() {
        let to = order[(w + 1) % lines];
        let at = from as usize * LINE;
        mem[at..at + 8].copy_from_slice(&to.to_le_bytes());
    }
    drop(order);
    let next = |at: u64| {
        let i = at as usize * LINE;
        let mut word = [0u8; 8];
        word.copy_from_slice(&mem[i..i + 8]);
        u64::from_le_bytes(word)
    };
    let mut at = 0;
    for _ in 0..hops.min(lines) {
        at = next(at);
    }
    let t = Instant::now();
    for _ in 0..hops {
        at = next(at);
    }
    black_box(at);
    t.elapsed().as_nanos() as f64 / hops.max(1) as f64
}
