//! Turning sources into a snapshot in service: merge and validation (DESIGN.md §6), and the
//! loader that rebuilds and publishes.

pub mod lifecycle;
pub mod loader;
pub mod merge;

pub use merge::{Conflict, Merged, merge};

/// What the audit log (and its rotated files) says about each of `addresses`: the
/// publishes that removed it from the sources (it became a tombstone) and those whose grace
/// period for it ran out, oldest first. The files are read once for all of them. Only the
/// first 100 addresses of each publish are named in the log.
pub fn audit_history(audit: &crate::config::AuditConfig, addresses: &[&str]) -> Vec<Vec<String>> {
    let mut files = vec![audit.path.clone()];
    for n in 1..=audit.keep {
        let mut p = audit.path.clone().into_os_string();
        p.push(format!(".{n}"));
        files.push(p.into());
    }
    let mut out: Vec<Vec<(u64, String)>> = vec![Vec::new(); addresses.len()];
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (time, generation) = (
                v["time"].as_u64().unwrap_or(0),
                v["generation"].as_u64().unwrap_or(0),
            );
            for (address, found) in addresses.iter().zip(out.iter_mut()) {
                let named = |k: &str| {
                    v[k].as_array()
                        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(address)))
                };
                if named("removed_sample") {
                    found.push((
                        time,
                        format!(
                            "{}: generation {generation} removed it from the sources ({})",
                            utc(time),
                            if v["tombstoned"].as_u64().unwrap_or(0) > 0 {
                                "kept as a tombstone for the grace period"
                            } else {
                                "no tombstone"
                            }
                        ),
                    ));
                }
                if named("expired_sample") {
                    found.push((
                        time,
                        format!(
                            "{}: generation {generation} dropped its tombstone (grace period over)",
                            utc(time)
                        ),
                    ));
                }
            }
        }
    }
    out.into_iter()
        .map(|mut h| {
            h.sort();
            h.into_iter().map(|(_, s)| s).collect()
        })
        .collect()
}

/// `YYYY-MM-DD HH:MM:SS UTC` for Unix seconds.
pub fn utc(t: u64) -> String {
    let (days, secs) = (t / 86_400, t % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(1_795_930_560), "2026-11-29 05:36:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
