//! rcptgate inside your own program: start the directory service from a config built in
//! code, answer lookups, print each recipient's verdict, route and profile.
//!
//! ```sh
//! cargo run --example embed -- alice@contoso.com nobody@contoso.com postmaster@contoso.com
//! ```

use std::time::Duration;

use rcptgate::config::{Config, SourceConfig};
use rcptgate::{Service, Verdict};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Where the directory comes from: the bundled example MAP file, watched for changes.
    let source = SourceConfig::file("example", "config/example.map".into())
        .ok_or("a source needs a name")?;
    let config = Config {
        sources: vec![source],
        max_age: Some(Duration::from_secs(24 * 3600)),
        ..Config::default()
    };
    let service = Service::start(config).await?;
    // The first build runs in the background; wait for it here.
    let built = service.reload().await?;
    println!("directory: {built:?}");

    let mut recipients: Vec<String> = std::env::args().skip(1).collect();
    if recipients.is_empty() {
        recipients = [
            "alice@contoso.com",
            "nobody@contoso.com",
            "someone@example.org",
        ]
        .map(String::from)
        .to_vec();
    }
    for rcpt in &recipients {
        // One answer, one generation: route and profile come from the snapshot that gave
        // the verdict, even if a new one is published meanwhile.
        let answer = service.directory().lookup(rcpt);
        match answer.verdict() {
            Verdict::Accept(hit) => println!(
                "{rcpt}: 250 {} route={} profile={}",
                hit.kind,
                answer.route().unwrap_or("(default)"),
                answer.profile().unwrap_or("(none)")
            ),
            Verdict::NotOurs => println!("{rcpt}: not one of our domains"),
            v => println!("{rcpt}: {} {}", v.code().unwrap_or(""), v.text()),
        }
    }
    service.shutdown().await;
    Ok(())
}
