//! Helpers shared by the integration test binaries.
#![allow(dead_code)]

use std::sync::Arc;

use rcptgate::directory::{Directory, LookupOptions, Snapshot};

/// A directory serving the bundled example (`loaded`), or nothing at all.
pub fn example_directory(loaded: bool) -> Arc<Directory> {
    let dir = Directory::new(LookupOptions::default());
    if loaded {
        let src = rcptgate::sources::load(
            rcptgate::sources::Format::Map,
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map").as_ref(),
        )
        .expect("example");
        let (bytes, _) = rcptgate::sync::merge(&[src], 1).build().expect("build");
        dir.publish(Arc::new(Snapshot::from_bytes(bytes).expect("load")));
    }
    Arc::new(dir)
}

/// One socketmap request on `s`; the reply's payload (`OK …`, `NOTFOUND `, `TEMP …`).
pub async fn socketmap_query(s: &mut tokio::net::TcpStream, query: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut framed = Vec::new();
    rcptgate::proto::netstring::encode(query.as_bytes(), &mut framed);
    s.write_all(&framed).await.expect("write");
    let mut buf = Vec::new();
    loop {
        if let Ok(rcptgate::proto::netstring::Decoded::Frame { payload, .. }) =
            rcptgate::proto::netstring::decode(&buf, 100_000)
        {
            return String::from_utf8_lossy(payload).into_owned();
        }
        let mut chunk = [0u8; 4096];
        let got = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut chunk))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(got > 0, "closed early");
        buf.extend_from_slice(&chunk[..got]);
    }
}
