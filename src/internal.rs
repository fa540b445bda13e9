//! Entry points shared by the fuzz targets and their unit tests. Each must never panic.

use std::sync::Arc;

use crate::address;
use crate::directory::Snapshot;
use crate::sources::{self, Format};

/// Parse and normalize arbitrary text as an address; normalization must be idempotent.
pub fn fuzz_address(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = address::normalize(s) {
        assert_eq!(
            address::normalize(&n).as_deref(),
            Ok(n.as_str()),
            "not idempotent: {s:?}"
        );
    }
}

/// Parse arbitrary bytes as a source file of the given format.
pub fn fuzz_source(format: Format, data: &[u8]) {
    let name: Arc<str> = Arc::from("fuzz");
    if let Ok(text) = sources::decode_utf8(&name, data) {
        let _ = sources::parse_text(format, &name, text);
    }
}

/// Load arbitrary bytes as a snapshot, and answer a few lookups if it loads.
pub fn fuzz_snapshot(data: &[u8]) {
    if let Ok(snap) = Snapshot::from_bytes(data.to_vec()) {
        let mut buf = address::AddrBuf::default();
        for q in ["alice@contoso.com", "x+y@example.com", "a@b"] {
            let v = snap.lookup(q, b"+", &mut buf);
            if let Some(hit) = v.hit() {
                let _ = snap.route(hit);
                let _ = snap.record_info(q, hit);
            }
        }
        snap.for_each_address(|_, _| {});
    }
}
