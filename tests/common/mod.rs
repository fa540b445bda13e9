//! Helpers shared by the integration test binaries.

use std::sync::Arc;

use rcptgate::directory::{self, Directory, LookupOptions, Snapshot};

/// A directory serving the bundled example (`loaded`), or nothing at all.
pub fn example_directory(loaded: bool) -> Arc<Directory> {
    let dir = Directory::new(LookupOptions::default());
    if loaded {
        let src =
            rcptgate::sources::load(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map"))
                .expect("example");
        let (bytes, _) = directory::build(rcptgate::sync::merge(&[src], 1).input).expect("build");
        dir.publish(Arc::new(Snapshot::from_bytes(bytes).expect("load")));
    }
    Arc::new(dir)
}
