//! Helpers shared by the integration test binaries.

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
