//! A fake Microsoft identity platform and Graph on loopback HTTPS (own CA, from
//! `slapd::make_pki`), answering with the shapes Microsoft documents: the v2.0 token endpoint
//! (client secret or signed client assertion; AADSTS errors), `/v1.0/users` and
//! `/v1.0/groups` paged by `@odata.nextLink`, `/users/delta` and `/groups/delta` with
//! `@removed` and `@odata.deltaLink` (`$deltatoken=latest` too), 410 `syncStateNotFound`
//! for an expired token, 429 with or without `Retry-After`, 403
//! `Authorization_RequestDenied`. The tenant is plain data the tests change.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
pub const SECRET: &str = "s3cr3t~value";

/// One change: (version, "users" | "groups", id).
type Change = (u64, String, String);

#[derive(Default)]
pub struct Tenant {
    pub secret: String,
    pub secret_expired: bool,
    /// PEM of the certificate whose key may sign client assertions.
    pub assertion_cert: Option<Vec<u8>>,
    pub users: BTreeMap<String, Value>,
    pub groups: BTreeMap<String, Value>,
    pub version: u64,
    pub changes: Vec<Change>,
    /// Delta tokens below this are refused (410 syncStateNotFound).
    pub oldest_token: u64,
    /// The next Graph requests are answered 429 (with `Retry-After` when `Some`).
    pub throttle: VecDeque<Option<u64>>,
    /// Collections answered 403 (`users`, `groups`).
    pub deny: Vec<String>,
    /// Every Graph request's path and query, in order.
    pub requests: Vec<String>,
    /// `ConsistencyLevel` headers seen.
    pub consistency: Vec<String>,
    pub tokens: u64,
}

impl Tenant {
    pub fn user(&mut self, id: &str, v: Value) {
        self.version += 1;
        self.users.insert(id.to_owned(), v);
        self.changes
            .push((self.version, "users".into(), id.to_owned()));
    }

    pub fn group(&mut self, id: &str, v: Value) {
        self.version += 1;
        self.groups.insert(id.to_owned(), v);
        self.changes
            .push((self.version, "groups".into(), id.to_owned()));
    }

    pub fn remove_user(&mut self, id: &str) {
        self.version += 1;
        self.users.remove(id);
        self.changes
            .push((self.version, "users".into(), id.to_owned()));
    }
}

pub fn user(id: &str, mail: &str, aliases: &[&str]) -> Value {
    let mut proxy = vec![format!("SMTP:{mail}")];
    proxy.extend(aliases.iter().map(|a| format!("smtp:{a}")));
    proxy.push(format!("SIP:{mail}"));
    json!({"id": id, "mail": mail, "userPrincipalName": mail, "accountEnabled": true,
        "userType": "Member", "displayName": id, "proxyAddresses": proxy})
}

/// The `[[source]]` block of a Graph source `entra` on this fake, its secret written to
/// `dir/graph.secret`.
pub fn source_block(dir: &Path, fake: &FakeGraph) -> String {
    let secret = dir.join("graph.secret");
    std::fs::write(&secret, SECRET).expect("secret");
    format!(
        "[[source]]\nname = \"entra\"\nkind = \"graph\"\n\
tenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT}\"\nclient_secret_file = \"{secret}\"\n\
authority = \"{url}\"\ngraph_url = \"{url}\"\nca_file = \"{ca}\"\n",
        secret = secret.display(),
        url = fake.url,
        ca = fake.ca.display()
    )
}

/// A daemon configuration for a Graph source `entra` on this fake (secret file written next
/// to it): `source` lines go into the source, `rest` after it (listeners, guard, …).
pub fn daemon_config(dir: &Path, fake: &FakeGraph, source: &str, rest: &str) -> PathBuf {
    let config = dir.join("rcptgate.toml");
    std::fs::write(
        &config,
        format!(
            "[directory]\nsnapshot = \"{}\"\n\n{}{source}\n{rest}",
            dir.join("snap").display(),
            source_block(dir, fake)
        ),
    )
    .expect("config");
    config
}

pub struct FakeGraph {
    pub url: String,
    pub ca: PathBuf,
    pub tenant: Arc<Mutex<Tenant>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl FakeGraph {
    /// Serve `tenant` on a free port; certificates go to `dir`.
    pub fn start(dir: &Path, tenant: Tenant) -> FakeGraph {
        Self::start_on(dir, tenant, 0)
    }

    pub fn start_on(dir: &Path, tenant: Tenant, port: u16) -> FakeGraph {
        if !dir.join("server.pem").exists() {
            crate::slapd::make_pki(dir, "Fake Graph CA");
        }
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server.pem"))
                .expect("cert")
                .collect::<Result<_, _>>()
                .expect("certs");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let url = format!("https://127.0.0.1:{port}");
        let tenant = Arc::new(Mutex::new(tenant));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (t, base) = (tenant.clone(), url.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        c = l.accept() => {
                            let Ok((c, _)) = c else { continue };
                            let (acceptor, t, base) = (acceptor.clone(), t.clone(), base.clone());
                            tokio::spawn(async move {
                                if let Ok(tls) = acceptor.accept(c).await {
                                    let _ = serve(tls, &t, &base).await;
                                }
                            });
                        }
                    }
                }
            });
            rt.shutdown_background();
        });
        FakeGraph {
            url,
            ca: dir.join("ca.pem"),
            tenant,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stop answering: the port is closed.
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Tenant) -> T) -> T {
        f(&mut self.tenant.lock().expect("tenant"))
    }
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Option<Request> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let mut lines = head.split("\r\n");
            let mut first = lines.next()?.split(' ');
            let method = first.next()?.to_owned();
            let target = first.next()?.to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 8192];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some(Request {
                method,
                target,
                headers,
                body,
            });
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    tenant: &Mutex<Tenant>,
    base: &str,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut s, &mut buf).await {
        let (status, extra, body) = {
            let mut t = tenant.lock().expect("tenant");
            answer(&req, &mut t, base)
        };
        let body = body.to_string();
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            410 => "Gone",
            429 => "Too Many Requests",
            _ => "Error",
        };
        let mut head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (n, v) in extra {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        s.flush().await?;
    }
    Ok(())
}

fn query(target: &str) -> BTreeMap<String, String> {
    let q = target.split_once('?').map_or("", |(_, q)| q);
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn graph_error(status: u16, code: &str, message: &str) -> (u16, Vec<(String, String)>, Value) {
    (
        status,
        Vec::new(),
        json!({"error": {"code": code, "message": message, "innerError": {"date": "2026-11-29T00:00:00", "request-id": "0"}}}),
    )
}

fn token_error(
    status: u16,
    error: &str,
    code: u64,
    text: &str,
) -> (u16, Vec<(String, String)>, Value) {
    (
        status,
        Vec::new(),
        json!({"error": error, "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 0\r\nCorrelation ID: 0\r\nTimestamp: 2026-11-29 00:00:00Z"),
            "error_codes": [code], "timestamp": "2026-11-29 00:00:00Z", "trace_id": "0", "correlation_id": "0"}),
    )
}

fn verify_assertion(jwt: &str, cert_pem: &[u8]) -> bool {
    use base64::Engine;
    use rustls::pki_types::pem::PemObject;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, c, sig] = parts[..] else { return false };
    let Ok(der) = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let key = cert
        .tbs_certificate
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let Ok(sig) = b64.decode(sig) else {
        return false;
    };
    let claims: Value = b64
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let header: Value = b64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    header["alg"] == "RS256"
        && header["x5t"].is_string()
        && claims["iss"] == CLIENT
        && claims["sub"] == CLIENT
        && ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            key,
        )
        .verify(format!("{h}.{c}").as_bytes(), &sig)
        .is_ok()
}

fn answer(req: &Request, t: &mut Tenant, base: &str) -> (u16, Vec<(String, String)>, Value) {
    let path = req.target.split('?').next().unwrap_or("").to_owned();
    if req.method == "POST" && path.ends_with("/oauth2/v2.0/token") {
        let tenant = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let form = query(&format!("?{}", String::from_utf8_lossy(&req.body)));
        if tenant != TENANT {
            return token_error(
                400,
                "invalid_request",
                90002,
                &format!("Tenant '{tenant}' not found."),
            );
        }
        if form.get("client_id").map(String::as_str) != Some(CLIENT) {
            return token_error(
                400,
                "unauthorized_client",
                700016,
                "Application with identifier was not found in the directory.",
            );
        }
        if form.get("grant_type").map(String::as_str) != Some("client_credentials")
            || !form.get("scope").is_some_and(|s| s.ends_with("/.default"))
        {
            return token_error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            );
        }
        let ok = match (form.get("client_secret"), form.get("client_assertion")) {
            (Some(s), None) => {
                if t.secret_expired {
                    return token_error(
                        401,
                        "invalid_client",
                        7000222,
                        "The provided client secret keys for app are expired.",
                    );
                }
                *s == t.secret
            }
            (None, Some(a)) => t
                .assertion_cert
                .as_deref()
                .is_some_and(|c| verify_assertion(a, c)),
            _ => false,
        };
        if !ok {
            return token_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            );
        }
        t.tokens += 1;
        return (
            200,
            Vec::new(),
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": format!("tok-{}", t.tokens)}),
        );
    }
    t.requests.push(req.target.clone());
    if let Some(c) = req.header("ConsistencyLevel") {
        t.consistency.push(c.to_owned());
    }
    if !req
        .header("Authorization")
        .is_some_and(|a| a.starts_with("Bearer tok-"))
    {
        return graph_error(401, "InvalidAuthenticationToken", "Access token is empty.");
    }
    if let Some(wait) = t.throttle.pop_front() {
        let headers = wait
            .map(|w| vec![("Retry-After".to_owned(), w.to_string())])
            .unwrap_or_default();
        let (s, _, b) = graph_error(429, "TooManyRequests", "Too many requests.");
        return (s, headers, b);
    }
    let q = query(&req.target);
    let kind = path
        .trim_start_matches("/v1.0/")
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned();
    if t.deny.contains(&kind) {
        return graph_error(
            403,
            "Authorization_RequestDenied",
            "Insufficient privileges to complete the operation.",
        );
    }
    if kind == "organization" {
        return (
            200,
            Vec::new(),
            json!({"value": [{"id": TENANT, "displayName": "Contoso",
                "verifiedDomains": [{"name": "contoso.com"}, {"name": "contoso.de"}, {"name": "contoso.onmicrosoft.com"}]}]}),
        );
    }
    if kind.starts_with("applications(") {
        if t.deny.iter().any(|d| d == "applications") {
            return graph_error(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            );
        }
        return (
            200,
            Vec::new(),
            json!({"displayName": "rcptgate", "passwordCredentials": [{"displayName": "gateway", "endDateTime": "2027-05-01T00:00:00Z"}], "keyCredentials": []}),
        );
    }
    if path.ends_with("/members") {
        return (200, Vec::new(), json!({"value": []}));
    }
    let map = match kind.as_str() {
        "users" => &t.users,
        "groups" => &t.groups,
        _ => return graph_error(404, "Request_ResourceNotFound", "Resource not found."),
    };
    // One object: /v1.0/users/{id or userPrincipalName}.
    let segments: Vec<&str> = path.trim_start_matches("/v1.0/").split('/').collect();
    if let [_, id] = segments[..]
        && id != "delta"
    {
        let id = decode(id);
        return match map
            .iter()
            .find(|(k, v)| **k == id || v["userPrincipalName"].as_str() == Some(id.as_str()))
        {
            Some((_, v)) => (200, Vec::new(), v.clone()),
            None => graph_error(
                404,
                "Request_ResourceNotFound",
                &format!("Resource '{id}' does not exist."),
            ),
        };
    }
    if path.ends_with("/delta") {
        let link = |v: u64| format!("{base}/v1.0/{kind}/delta?$deltatoken={v}");
        match q.get("$deltatoken").map(String::as_str) {
            Some("latest") => {
                return (
                    200,
                    Vec::new(),
                    json!({"value": [], "@odata.deltaLink": link(t.version)}),
                );
            }
            Some(v) => {
                let v: u64 = v.parse().unwrap_or(0);
                if v < t.oldest_token {
                    return graph_error(
                        410,
                        "syncStateNotFound",
                        "The sync state generation is not found. Delta tokens can expire.",
                    );
                }
                let mut ids: Vec<&String> = t
                    .changes
                    .iter()
                    .filter(|(at, k, _)| *at > v && *k == kind)
                    .map(|(_, _, id)| id)
                    .collect();
                ids.sort();
                ids.dedup();
                let value: Vec<Value> = ids
                    .into_iter()
                    .map(|id| match map.get(id) {
                        Some(o) => o.clone(),
                        None => json!({"id": id, "@removed": {"reason": "deleted"}}),
                    })
                    .collect();
                return (
                    200,
                    Vec::new(),
                    json!({"value": value, "@odata.deltaLink": link(t.version)}),
                );
            }
            None => {
                return graph_error(
                    400,
                    "BadRequest",
                    "initial delta rounds are not served by this fake",
                );
            }
        }
    }
    // Listing: filtered lazily, one page cloned (the benchmark serves 120k objects).
    type Keep = Box<dyn Fn(&Value) -> bool>;
    let keep: Keep = match q.get("$filter").map(String::as_str) {
        None => Box::new(|_| true),
        Some("mailEnabled eq true") => Box::new(|o| o["mailEnabled"] == true),
        Some("accountEnabled eq true") => Box::new(|o| o["accountEnabled"] == true),
        Some(f) if f.starts_with("mail eq '") => {
            let want = f["mail eq '".len()..].trim_end_matches('\'').to_owned();
            Box::new(move |o| o["mail"].as_str() == Some(want.as_str()))
        }
        Some(f) if f.starts_with("proxyAddresses/any(p:p eq 'smtp:") => {
            if req.header("ConsistencyLevel") != Some("eventual") {
                return graph_error(
                    400,
                    "Request_UnsupportedQuery",
                    "proxyAddresses/any needs ConsistencyLevel: eventual",
                );
            }
            let want = f["proxyAddresses/any(p:p eq 'smtp:".len()..]
                .trim_end_matches("')")
                .to_ascii_lowercase();
            Box::new(move |o| {
                o["proxyAddresses"].as_array().is_some_and(|a| {
                    a.iter().any(|p| {
                        p.as_str()
                            .is_some_and(|p| p.to_ascii_lowercase() == format!("smtp:{want}"))
                    })
                })
            })
        }
        Some(f) => match f
            .strip_prefix("endsWith(mail,'")
            .and_then(|r| r.strip_suffix("')"))
        {
            Some(dom) => {
                if req.header("ConsistencyLevel") != Some("eventual") {
                    return graph_error(
                        400,
                        "Request_UnsupportedQuery",
                        "Unsupported or invalid query filter clause specified for property 'mail' of resource 'User'.",
                    );
                }
                let dom = dom.to_owned();
                Box::new(move |o| o["mail"].as_str().is_some_and(|m| m.ends_with(&dom)))
            }
            None => return graph_error(400, "Request_UnsupportedQuery", "Unsupported query."),
        },
    };
    let top: usize = q.get("$top").and_then(|v| v.parse().ok()).unwrap_or(100);
    // The skip token is the last key served (like Graph's opaque cursor).
    let after = q.get("$skiptoken").cloned();
    let mut it = map
        .range::<String, _>((
            after
                .as_ref()
                .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
            std::ops::Bound::Unbounded,
        ))
        .filter(|(_, v)| keep(v));
    let page: Vec<(&String, &Value)> = it.by_ref().take(top).collect();
    let more = it.next().is_some();
    let last = page.last().map(|(k, _)| (*k).clone());
    let value: Vec<Value> = page.into_iter().map(|(_, v)| v.clone()).collect();
    let mut body =
        json!({"@odata.context": format!("{base}/v1.0/$metadata#{kind}"), "value": value});
    if let (true, Some(last)) = (more, last) {
        let mut next = format!(
            "{base}{}",
            req.target.split("&$skiptoken").next().unwrap_or("")
        );
        next.push_str(&format!("&$skiptoken={last}"));
        body["@odata.nextLink"] = json!(next);
    }
    (200, Vec::new(), body)
}
