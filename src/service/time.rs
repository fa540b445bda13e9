//! Times as people read them (UTC), for status lines and exports.

/// A Unix time as `YYYY-MM-DD HH:MM:SSZ`.
pub fn when(unix: u64) -> String {
    let d = unix / 86_400;
    let (h, m, s) = (unix % 86_400 / 3600, unix % 3600 / 60, unix % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}Z")
}

/// A span of seconds as `3d 4h`, `2h 5m` or `4m 10s`.
pub fn span(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}m {}s", s / 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::when(0), "1970-01-01 00:00:00Z");
        assert_eq!(super::when(1_796_000_000), "2026-11-30 00:53:20Z");
        assert_eq!(super::span(90_000), "1d 1h");
        assert_eq!(super::span(61), "1m 1s");
    }
}
