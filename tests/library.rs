//! rcptgate as an MTA embeds it: only the public API. The service starts from a config
//! built in code, follows a source file as it is edited, defers unknown recipients once its
//! data is older than `max_age`, answers control operations, and shuts down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcptgate::config::{Config, SourceConfig};
use rcptgate::service::Rebuilt;
use rcptgate::{Kind, Reject, Service, Tempfail, Verdict};

const T0: u64 = 1_800_000_000;

/// Poll `f` until it is true (the service works in the background); panics after 30 s.
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedder_follows_edits_gets_tempfails_past_max_age_and_shuts_down() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = tmp.path().join("users.map");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.map"))
            .expect("example");
    std::fs::write(&map, &example).expect("map");

    let config = Config {
        snapshot: Some(tmp.path().join("snapshot.bin")),
        max_age: Some(Duration::from_secs(3600)),
        debounce: Duration::from_millis(50),
        sources: vec![SourceConfig::file("dirsync", map.clone()).expect("source")],
        ..Config::default()
    };
    let now = Arc::new(AtomicU64::new(T0));
    let clock = {
        let now = now.clone();
        Arc::new(move || now.load(Ordering::Relaxed))
    };
    let service = Service::builder(config)
        .clock(clock)
        .start()
        .await
        .expect("start");
    let dir = service.directory().clone();

    // Before the first build: unsure, so a temporary failure.
    // (The first build may already be done; either way never a reject.)
    let first = dir.lookup("nobody@contoso.com").verdict();
    assert!(
        matches!(
            first,
            Verdict::Tempfail(Tempfail::NotLoaded) | Verdict::Reject(Reject::UnknownUser)
        ),
        "{first:?}"
    );
    let r = service.reload().await.expect("reload");
    assert!(
        matches!(
            r,
            Rebuilt::Published { generation: 1, .. } | Rebuilt::Unchanged { generation: 1 }
        ),
        "{r:?}"
    );
    let a = dir.lookup("alice@contoso.com");
    assert_eq!(a.kind(), Some(Kind::Alias));
    assert_eq!(a.route(), Some("smtp:[exch01.corp.contoso.com]:25"));
    assert_eq!(a.profile(), Some("executives"));
    assert_eq!(
        dir.lookup("nobody@contoso.com").verdict(),
        Verdict::Reject(Reject::UnknownUser)
    );
    assert_eq!(
        dir.lookup("Postmaster@contoso.com").kind(),
        Some(Kind::Reserved)
    );

    // The source file is edited: the service notices by itself.
    let edited = example.replace(
        "++++\n",
        "10001|contoso.com\tDIR:\tnew.hire@contoso.com\n++++\n",
    );
    std::fs::write(&map, &edited).expect("edit");
    until("the new hire", async || {
        matches!(
            dir.lookup("new.hire@contoso.com").verdict(),
            Verdict::Accept(_)
        )
    })
    .await;
    assert_eq!(dir.generation(), Some(2));

    // The upload breaks (no ++++ trailer) and stays broken: the data ages.
    let failed = service.status().await.expect("status").reloads_failed;
    std::fs::write(&map, &edited[..edited.len() - 5]).expect("truncate");
    until("the failed rebuild", async || {
        service
            .status()
            .await
            .is_ok_and(|s| s.reloads_failed > failed)
    })
    .await;
    assert_eq!(
        dir.lookup("nobody@contoso.com").verdict(),
        Verdict::Reject(Reject::UnknownUser)
    );
    // Past max_age: unknown recipients are deferred, known ones still accepted.
    now.store(T0 + 3601, Ordering::Relaxed);
    assert_eq!(
        dir.lookup("nobody@contoso.com").verdict(),
        Verdict::Tempfail(Tempfail::Stale)
    );
    assert!(matches!(
        dir.lookup("new.hire@contoso.com").verdict(),
        Verdict::Accept(_)
    ));
    let s = service.status().await.expect("status");
    assert!(s.stale, "{s:?}");
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("users.map")),
        "{s:?}"
    );

    // Fixed: fresh again, and rejects are definitive again.
    std::fs::write(&map, &edited).expect("fix");
    until("fresh data", async || !dir.is_stale()).await;
    assert_eq!(
        dir.lookup("nobody@contoso.com").verdict(),
        Verdict::Reject(Reject::UnknownUser)
    );

    service.shutdown().await;
    // The directory stays usable after the service stops; control operations say so.
    assert!(matches!(
        dir.lookup("alice@contoso.com").verdict(),
        Verdict::Accept(_)
    ));
    assert!(service.status().await.is_err());
}

/// An answer can be held across an `.await` in a spawned task.
#[test]
fn answers_and_handles_are_send() {
    fn send<T: Send + 'static>() {}
    send::<rcptgate::Answer>();
    send::<rcptgate::Handle>();
    send::<rcptgate::Verdict>();
}
