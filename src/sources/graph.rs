//! Microsoft Graph (Entra ID) as a live source: an app registration's client-credentials
//! token, `/users` and `/groups` paged by `@odata.nextLink`, then `/users/delta` and
//! `/groups/delta` between full syncs. Every object goes through the same AD mapper as LDAP
//! and LDIF ([`super::ad::map_entry`]): `proxyAddresses` `SMTP:` is the primary, `smtp:` the
//! aliases, other prefixes ignored, `mail` the primary without an `SMTP:` value; the UPN is
//! a login name and never an address by itself.
//!
//! - Shared mailboxes are disabled users with a mail address: kept by default
//!   (`include_disabled`), as in Exchange Online, where every shared mailbox is a disabled
//!   account; excluding them would reject their mail.
//! - Guests (`userType = Guest`) are not ours: skipped unless `include_guests`.
//! - Groups only when `mailEnabled` (distribution, mail-enabled security, Microsoft 365).
//! - `user_filter` (`$filter` on `/users`) makes every sync a full one: delta queries take no
//!   filter, and a filter cannot be applied to delta results here.
//!
//! HTTPS with rustls against the system roots, or only `ca_file`; verification is never off.
//! 429 and 503 honour `Retry-After` (else 1, 2, 4 … s), `retries` times. A failure anywhere
//! is an error, never a partial result: the loader keeps the snapshot in service.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::ad::{self, AdOptions, DirEntry};
use super::ldap::{PasswordSource, Secret};
use super::{Format, SourceData};

/// What `/users` is asked for.
pub const USER_FIELDS: &str =
    "id,mail,proxyAddresses,userPrincipalName,accountEnabled,userType,displayName";
/// What `/groups` is asked for.
pub const GROUP_FIELDS: &str =
    "id,mail,proxyAddresses,mailEnabled,securityEnabled,groupTypes,displayName";

/// How the app proves who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A client secret, read at every token request.
    Secret(PasswordSource),
    /// A certificate credential: an RSA private key (PKCS#8 PEM) and its certificate (PEM),
    /// for a signed client assertion (tenants that forbid secrets).
    Certificate {
        /// The private key.
        key: PathBuf,
        /// The certificate uploaded to the app registration.
        cert: PathBuf,
    },
}

/// One Graph source, as configured.
#[derive(Debug, Clone)]
pub struct GraphConfig {
    /// The directory (tenant) ID or a verified domain of the tenant.
    pub tenant_id: String,
    /// The app registration's application (client) ID.
    pub client_id: String,
    /// Secret or certificate.
    pub credential: Credential,
    /// `https://login.microsoftonline.com` (national clouds and tests change it).
    pub authority: String,
    /// `https://graph.microsoft.com`.
    pub graph_url: String,
    /// Trust only this CA (PEM) instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Keep disabled users with a mail address (shared mailboxes).
    pub include_disabled: bool,
    /// Keep guests (`userType = Guest`).
    pub include_guests: bool,
    /// `$filter` for `/users` (full syncs only).
    pub user_filter: Option<String>,
    /// Objects per page (`$top`, at most 999).
    pub page_size: u32,
    /// Each HTTP request.
    pub timeout: Duration,
    /// Attempts after a throttled (429/503) or failed request.
    pub retries: u32,
}

impl GraphConfig {
    /// A source with the defaults: the public cloud, the system roots, shared mailboxes kept,
    /// guests left out, no filter, pages of 999, 60 s per request, 4 retries.
    pub fn new(tenant_id: &str, client_id: &str, credential: Credential) -> GraphConfig {
        GraphConfig {
            tenant_id: tenant_id.to_owned(),
            client_id: client_id.to_owned(),
            credential,
            authority: "https://login.microsoftonline.com".into(),
            graph_url: "https://graph.microsoft.com".into(),
            ca_file: None,
            include_disabled: true,
            include_guests: false,
            user_filter: None,
            page_size: 999,
            timeout: Duration::from_secs(60),
            retries: 4,
        }
    }
}

/// Why a sync failed, with what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum GraphError {
    #[error("{0}")]
    Config(String),
    #[error(
        "cannot reach {url}: {detail} (network, proxy or firewall; or a certificate from an unknown CA: set ca_file)"
    )]
    Connect { url: String, detail: String },
    #[error("token request refused: {detail}{}", fix.as_deref().map(|f| format!(" — {f}")).unwrap_or_default())]
    Auth { detail: String, fix: Option<String> },
    #[error(
        "{what}: access denied ({detail}) — grant the application permission {permission} and an administrator's consent in the app registration"
    )]
    Permission {
        what: String,
        permission: &'static str,
        detail: String,
    },
    #[error(
        "{url}: still throttled after {attempts} attempt(s) (HTTP {status}); the next sync tries again"
    )]
    Throttled {
        url: String,
        status: u16,
        attempts: u32,
    },
    #[error("{url}: HTTP {status}: {detail}")]
    Http {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: unexpected answer: {detail}")]
    Format { url: String, detail: String },
    #[error(
        "{0} returned no user or group with a mail address; refusing an empty directory (check the permissions and user_filter)"
    )]
    Empty(String),
}

/// What an AADSTS code means and what to fix.
pub fn aadsts_fix(code: u64) -> Option<&'static str> {
    Some(match code {
        7000215 => "wrong client secret: put the secret's value (not its ID) in client_secret_file",
        7000222 => {
            "the client secret has expired: create a new one in the app registration and update client_secret_file"
        }
        700016 => "wrong client_id, or the app is not registered in this tenant",
        90002 | 900023 => "wrong tenant_id: use the directory (tenant) ID or a verified domain",
        700027 | 700024 => {
            "the client assertion is not valid: check the certificate uploaded to the app registration and the clock"
        }
        7000112 => "the application is disabled",
        65001 => "the application has no administrator consent",
        _ => return None,
    })
}

/// Where the last sync left off: the delta links (none with a `user_filter`), when the last
/// full sync ran, and the objects seen (a delta answer may carry only what changed).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DeltaMark {
    /// `@odata.deltaLink` of `/users/delta`.
    pub users: Option<String>,
    /// `@odata.deltaLink` of `/groups/delta`.
    pub groups: Option<String>,
    /// When the last full sync ran (Unix seconds).
    pub full_at: u64,
    /// Every object by `users/ID` or `groups/ID`, as Graph returned it.
    pub objects: HashMap<String, Map<String, Value>>,
}

impl PartialEq for DeltaMark {
    fn eq(&self, o: &Self) -> bool {
        self.users == o.users && self.groups == o.groups && self.full_at == o.full_at
    }
}

/// What [`sync`] did.
#[derive(Debug)]
pub enum Synced {
    /// A full sync.
    Full(SourceData, DeltaMark),
    /// Changes since the last delta links, applied.
    Incremental {
        /// All of the source's data, with the changes applied.
        data: SourceData,
        /// Where the next sync starts.
        mark: DeltaMark,
        /// Objects changed or removed.
        changed: u64,
    },
    /// Nothing changed.
    Unchanged(DeltaMark),
}

/// How a sync is going.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Objects read so far.
    pub objects: u64,
    /// Pages read so far.
    pub pages: u64,
    /// Time since the sync started.
    pub elapsed: Duration,
}

/// Tokens by (authority, tenant, client), kept until a minute before they expire.
static TOKENS: Mutex<Vec<(String, String, Instant)>> = Mutex::new(Vec::new());

/// An authenticated Graph client for one sync.
pub struct Client<'c> {
    cfg: &'c GraphConfig,
    http: reqwest::blocking::Client,
    token: Option<String>,
    /// Seconds the token has left when it was issued (for `graph-test`).
    pub token_expires_in: Option<u64>,
}

impl std::fmt::Debug for Client<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("tenant", &self.cfg.tenant_id)
            .finish_non_exhaustive()
    }
}

fn tls_config(cfg: &GraphConfig) -> Result<rustls::ClientConfig, GraphError> {
    let roots = match &cfg.ca_file {
        Some(ca) => super::ldap::ca_roots(ca).map_err(|e| GraphError::Config(e.to_string()))?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(GraphError::Config(
                    "no system root certificates found (install ca-certificates, or set ca_file)"
                        .into(),
                ));
            }
            roots
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GraphError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl<'c> Client<'c> {
    /// A client with its TLS configuration; no request yet.
    pub fn new(cfg: &'c GraphConfig) -> Result<Client<'c>, GraphError> {
        let http = reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls_config(cfg)?)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("rcptgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GraphError::Config(format!("HTTP client: {e}")))?;
        Ok(Client {
            cfg,
            http,
            token: None,
            token_expires_in: None,
        })
    }

    fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.cfg.authority.trim_end_matches('/'),
            self.cfg.tenant_id
        )
    }

    /// An access token: cached until a minute before it expires, else asked for.
    pub fn token(&mut self) -> Result<String, GraphError> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let key = format!(
            "{}|{}|{}",
            self.cfg.authority, self.cfg.tenant_id, self.cfg.client_id
        );
        if let Ok(cache) = TOKENS.lock()
            && let Some((_, t, until)) = cache.iter().find(|(k, _, _)| *k == key)
            && Instant::now() < *until
        {
            self.token = Some(t.clone());
            return Ok(t.clone());
        }
        let url = self.token_url();
        let scope = format!("{}/.default", self.cfg.graph_url.trim_end_matches('/'));
        let mut form: Vec<(&str, String)> = vec![
            ("client_id", self.cfg.client_id.clone()),
            ("scope", scope),
            ("grant_type", "client_credentials".into()),
        ];
        match &self.cfg.credential {
            Credential::Secret(src) => {
                let secret = read_secret(src)?;
                form.push(("client_secret", secret.expose().to_owned()));
            }
            Credential::Certificate { key, cert } => {
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push((
                    "client_assertion",
                    client_assertion(key, cert, &self.cfg.client_id, &url)?,
                ));
            }
        }
        let resp = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .map_err(|e| connect_error(&url, &e))?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().map_err(|e| GraphError::Format {
            url: url.clone(),
            detail: format!("HTTP {status}, not JSON: {e}"),
        })?;
        if status != 200 {
            let desc = body["error_description"]
                .as_str()
                .or(body["error"].as_str())
                .unwrap_or("no error description")
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            let code = body["error_codes"][0].as_u64().or_else(|| aadsts_in(&desc));
            return Err(GraphError::Auth {
                detail: format!("HTTP {status}: {desc}"),
                fix: code.and_then(aadsts_fix).map(str::to_owned),
            });
        }
        let token = body["access_token"]
            .as_str()
            .ok_or_else(|| GraphError::Format {
                url: url.clone(),
                detail: "no access_token".into(),
            })?
            .to_owned();
        let expires = body["expires_in"].as_u64().unwrap_or(3599);
        self.token_expires_in = Some(expires);
        if let Ok(mut cache) = TOKENS.lock() {
            cache.retain(|(k, _, _)| *k != key);
            cache.push((
                key,
                token.clone(),
                Instant::now() + Duration::from_secs(expires.saturating_sub(60)),
            ));
        }
        self.token = Some(token.clone());
        Ok(token)
    }

    fn forget_token(&mut self) {
        self.token = None;
        let key = format!(
            "{}|{}|{}",
            self.cfg.authority, self.cfg.tenant_id, self.cfg.client_id
        );
        if let Ok(mut cache) = TOKENS.lock() {
            cache.retain(|(k, _, _)| *k != key);
        }
    }

    /// GET one Graph URL as JSON: throttling honoured, a token that expired renewed once.
    /// `what` names the request in errors (`/users`), `permission` the right it needs.
    pub fn get(
        &mut self,
        url: &str,
        advanced: bool,
        what: &str,
        permission: &'static str,
    ) -> Result<Value, GraphError> {
        let mut attempt = 0u32;
        let mut renewed = false;
        loop {
            attempt += 1;
            let token = self.token()?;
            let mut req = self.http.get(url).bearer_auth(&token);
            if advanced {
                req = req.header("ConsistencyLevel", "eventual");
            }
            let resp = match req.send() {
                Ok(r) => r,
                Err(e) => {
                    if attempt <= self.cfg.retries {
                        backoff(attempt, None);
                        continue;
                    }
                    return Err(connect_error(url, &e));
                }
            };
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if status == 200 {
                return resp.json().map_err(|e| GraphError::Format {
                    url: url.to_owned(),
                    detail: format!("not JSON: {e}"),
                });
            }
            let body: Value = resp.json().unwrap_or(Value::Null);
            let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
            let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
            match status {
                429 | 503 | 504 if attempt <= self.cfg.retries => {
                    tracing::warn!(
                        url,
                        status,
                        retry_after,
                        "Graph throttled ({status}); waiting"
                    );
                    backoff(attempt, retry_after);
                }
                429 | 503 | 504 => {
                    return Err(GraphError::Throttled {
                        url: url.to_owned(),
                        status,
                        attempts: attempt,
                    });
                }
                401 if !renewed => {
                    renewed = true;
                    attempt -= 1;
                    self.forget_token();
                }
                403 => {
                    return Err(GraphError::Permission {
                        what: what.to_owned(),
                        permission,
                        detail: if code.is_empty() {
                            format!("HTTP 403 {message}")
                        } else {
                            format!("{code}: {message}")
                        },
                    });
                }
                _ => {
                    return Err(GraphError::Http {
                        url: url.to_owned(),
                        status,
                        detail: if code.is_empty() {
                            message
                        } else {
                            format!("{code}: {message}")
                        },
                    });
                }
            }
        }
    }

    /// Every page from `first`, each object given to `each`; the `@odata.deltaLink` of the
    /// last page, if any.
    pub fn pages(
        &mut self,
        first: &str,
        advanced: bool,
        what: &str,
        permission: &'static str,
        mut each: impl FnMut(Map<String, Value>),
        mut page: impl FnMut(),
    ) -> Result<Option<String>, GraphError> {
        let mut url = first.to_owned();
        loop {
            let mut v = self.get(&url, advanced, what, permission)?;
            let items = match v.get_mut("value").map(Value::take) {
                Some(Value::Array(a)) => a,
                _ => {
                    return Err(GraphError::Format {
                        url,
                        detail: "no \"value\" array".into(),
                    });
                }
            };
            for it in items {
                if let Value::Object(m) = it {
                    each(m);
                }
            }
            page();
            if let Some(next) = v["@odata.nextLink"].as_str() {
                url = next.to_owned();
                continue;
            }
            return Ok(v["@odata.deltaLink"].as_str().map(str::to_owned));
        }
    }

    /// `GRAPH/v1.0/PATH`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/v1.0/{path}", self.cfg.graph_url.trim_end_matches('/'))
    }
}

fn aadsts_in(text: &str) -> Option<u64> {
    let rest = text.split("AADSTS").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn connect_error(url: &str, e: &reqwest::Error) -> GraphError {
    use std::error::Error;
    let mut detail = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        src = s.source();
    }
    GraphError::Connect {
        url: url.to_owned(),
        detail,
    }
}

/// Wait before the next attempt: `Retry-After` when given (at most 5 minutes), else 1, 2,
/// 4 … s.
fn backoff(attempt: u32, retry_after: Option<u64>) {
    let secs = retry_after
        .unwrap_or(1u64 << attempt.saturating_sub(1).min(6))
        .min(300);
    std::thread::sleep(Duration::from_secs(secs));
}

fn read_secret(src: &PasswordSource) -> Result<Secret, GraphError> {
    match src {
        PasswordSource::None => Err(GraphError::Config("no client secret configured".into())),
        PasswordSource::File(p) => std::fs::read_to_string(p)
            .map(|s| Secret::new(s.trim_end_matches(['\r', '\n']).to_owned()))
            .map_err(|e| GraphError::Config(format!("client_secret_file {}: {e}", p.display()))),
        PasswordSource::Env(v) => std::env::var(v)
            .map(Secret::new)
            .map_err(|_| GraphError::Config(format!("client_secret_env {v} is not set"))),
    }
}

/// A signed client assertion (RFC 7523, as Entra ID wants it): RS256 over the header
/// (`x5t` = SHA-1 thumbprint of the certificate) and claims (`aud` = the token endpoint,
/// `iss` = `sub` = the client ID, ten minutes of validity).
fn client_assertion(
    key: &std::path::Path,
    cert: &std::path::Path,
    client_id: &str,
    aud: &str,
) -> Result<String, GraphError> {
    use base64::Engine;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let bad =
        |what: &std::path::Path, e: String| GraphError::Config(format!("{}: {e}", what.display()));
    let der = CertificateDer::from_pem_file(cert).map_err(|e| bad(cert, e.to_string()))?;
    let pkcs8 = PrivatePkcs8KeyDer::from_pem_file(key).map_err(|e| {
        bad(
            key,
            format!("{e} (an RSA key in PKCS#8 PEM: BEGIN PRIVATE KEY)"),
        )
    })?;
    let pair = ring::signature::RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der())
        .map_err(|e| bad(key, format!("not an RSA key: {e}")))?;
    let thumb = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der.as_ref());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
        .map_err(|_| GraphError::Config("no randomness".into()))?;
    let header =
        serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": b64.encode(thumb.as_ref())});
    let claims = serde_json::json!({
        "aud": aud, "iss": client_id, "sub": client_id,
        "jti": crate::dane::policy::hex(&jti), "nbf": now, "iat": now, "exp": now + 600,
    });
    let signing = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let mut sig = vec![0u8; pair.public().modulus_len()];
    pair.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing.as_bytes(),
        &mut sig,
    )
    .map_err(|_| bad(key, "signing failed".into()))?;
    Ok(format!("{signing}.{}", b64.encode(sig)))
}

/// The object as the AD mapper sees it.
pub fn dir_entry(key: &str, o: &Map<String, Value>) -> DirEntry {
    let mut attrs = Vec::new();
    let group = key.starts_with("groups/");
    attrs.push((
        "objectClass".to_owned(),
        if group { "group" } else { "user" }.to_owned(),
        0,
    ));
    if let Some(m) = o.get("mail").and_then(Value::as_str) {
        attrs.push(("mail".to_owned(), m.to_owned(), 0));
    }
    if let Some(Value::Array(p)) = o.get("proxyAddresses") {
        for v in p.iter().filter_map(Value::as_str) {
            attrs.push(("proxyAddresses".to_owned(), v.to_owned(), 0));
        }
    }
    if !group {
        let enabled = o
            .get("accountEnabled")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        attrs.push((
            "userAccountControl".to_owned(),
            if enabled { "512" } else { "514" }.to_owned(),
            0,
        ));
    }
    let upn = o.get("userPrincipalName").and_then(Value::as_str);
    DirEntry {
        dn: match upn {
            Some(u) => format!("{key} ({u})"),
            None => key.to_owned(),
        },
        line: 0,
        attrs,
    }
}

/// Why an object is left out before mapping (guest, group not mail-enabled), if it is.
pub fn excluded(key: &str, o: &Map<String, Value>, cfg: &GraphConfig) -> Option<&'static str> {
    if key.starts_with("groups/") {
        return (o.get("mailEnabled").and_then(Value::as_bool) != Some(true))
            .then_some("group not mail-enabled");
    }
    if !cfg.include_guests
        && o.get("userType")
            .and_then(Value::as_str)
            .is_some_and(|t| t.eq_ignore_ascii_case("guest"))
    {
        return Some("guest (include_guests = false)");
    }
    None
}

/// Map every object (in key order, so builds are repeatable) into the source's data.
pub fn build_data(
    name: &Arc<str>,
    cfg: &GraphConfig,
    objects: &HashMap<String, Map<String, Value>>,
) -> (SourceData, BTreeMap<&'static str, u64>) {
    let mut data = SourceData::new(name, Format::Graph);
    let mut skipped: BTreeMap<&'static str, u64> = BTreeMap::new();
    let opts = AdOptions {
        include_disabled: cfg.include_disabled,
    };
    let mut keys: Vec<&String> = objects.keys().collect();
    keys.sort_unstable();
    for k in keys {
        let o = &objects[k];
        let entry = dir_entry(k, o);
        if let Some(why) = excluded(k, o, cfg) {
            *skipped.entry(why).or_default() += 1;
            let reason = if k.starts_with("groups/") {
                crate::directory::explain::Reason::NotMailEnabled
            } else {
                crate::directory::explain::Reason::Guest
            };
            data.excluded
                .extend(ad::exclusions(&entry, name, reason, why));
            continue;
        }
        let m = ad::map_entry(&entry, name, &opts);
        if let Some(why) = m.skipped {
            *skipped.entry(why).or_default() += 1;
        }
        data.entries.extend(m.entries);
        data.diagnostics.extend(m.diagnostics);
        data.excluded.extend(m.excluded);
    }
    (data, skipped)
}

fn users_url(c: &Client<'_>, cfg: &GraphConfig) -> (String, bool) {
    let mut url = c.url(&format!(
        "users?$select={USER_FIELDS}&$top={}",
        cfg.page_size.clamp(1, 999)
    ));
    let mut advanced = false;
    if let Some(f) = &cfg.user_filter {
        url.push_str("&$filter=");
        url.push_str(&encode_query(f));
        let lower = f.to_ascii_lowercase();
        // Filters Graph answers only as advanced queries.
        advanced = ["endswith(", " ne ", "not(", "not ", "$count", "/$count"]
            .iter()
            .any(|p| lower.contains(p));
        if advanced {
            url.push_str("&$count=true");
        }
    }
    (url, advanced)
}

fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A full sync: delta links first (changes during the fetch are seen next time), then every
/// user and mail-enabled group.
pub fn full(
    name: &Arc<str>,
    cfg: &GraphConfig,
    now: u64,
    mut progress: impl FnMut(Progress),
) -> Result<(SourceData, DeltaMark), GraphError> {
    let started = Instant::now();
    let mut c = Client::new(cfg)?;
    let mut mark = DeltaMark {
        full_at: now,
        ..DeltaMark::default()
    };
    if cfg.user_filter.is_none() {
        mark.users = latest_link(&mut c, "users", USER_FIELDS, "User.Read.All")?;
        mark.groups = latest_link(&mut c, "groups", GROUP_FIELDS, "Group.Read.All")?;
    }
    let (users, advanced) = users_url(&c, cfg);
    let mut p = Progress::default();
    let objects = &mut mark.objects;
    let mut tick = |p: &mut Progress| {
        p.pages += 1;
        p.elapsed = started.elapsed();
        progress(*p);
    };
    let counter = std::cell::Cell::new(0u64);
    c.pages(
        &users,
        advanced,
        "/users",
        "User.Read.All",
        |o| {
            if let Some(id) = o.get("id").and_then(Value::as_str) {
                objects.insert(format!("users/{id}"), o.clone());
                counter.set(counter.get() + 1);
            }
        },
        || {
            p.objects = counter.get();
            tick(&mut p);
        },
    )?;
    let groups = c.url(&format!(
        "groups?$select={GROUP_FIELDS}&$filter=mailEnabled%20eq%20true&$top={}",
        cfg.page_size.clamp(1, 999)
    ));
    c.pages(
        &groups,
        false,
        "/groups",
        "Group.Read.All",
        |o| {
            if let Some(id) = o.get("id").and_then(Value::as_str) {
                objects.insert(format!("groups/{id}"), o.clone());
                counter.set(counter.get() + 1);
            }
        },
        || {
            p.objects = counter.get();
            tick(&mut p);
        },
    )?;
    let (data, skipped) = build_data(name, cfg, &mark.objects);
    if data.entries.is_empty() {
        return Err(GraphError::Empty(cfg.graph_url.clone()));
    }
    if !skipped.is_empty() {
        tracing::debug!(source = %name, ?skipped, "Graph objects without addresses");
    }
    Ok((data, mark))
}

/// A delta link that starts now (`$deltatoken=latest`: no objects, just the link).
fn latest_link(
    c: &mut Client<'_>,
    kind: &str,
    fields: &str,
    permission: &'static str,
) -> Result<Option<String>, GraphError> {
    let url = c.url(&format!("{kind}/delta?$select={fields}&$deltatoken=latest"));
    c.pages(
        &url,
        false,
        &format!("/{kind}/delta"),
        permission,
        |_| {},
        || {},
    )
}

/// Whether an error is Graph saying the delta token is no good any more.
fn sync_state_lost(e: &GraphError) -> bool {
    matches!(e, GraphError::Http { status: 410, .. })
        || matches!(e, GraphError::Http { detail, .. } if detail.contains("syncStateNotFound") || detail.contains("resyncRequired"))
}

/// Sync a source: incrementally from the delta links when the last full sync is younger
/// than `full_every`; in full otherwise, or when Graph refuses the delta token.
pub fn sync(
    name: &Arc<str>,
    cfg: &GraphConfig,
    prev: Option<&DeltaMark>,
    now: u64,
    full_every: Duration,
    progress: impl FnMut(Progress),
) -> Result<Synced, GraphError> {
    let Some(m) = prev.filter(|m| {
        m.users.is_some()
            && m.groups.is_some()
            && now < m.full_at.saturating_add(full_every.as_secs())
    }) else {
        return full(name, cfg, now, progress).map(|(d, m)| Synced::Full(d, m));
    };
    match incremental(cfg, m) {
        Ok(None) => Ok(Synced::Unchanged(m.clone())),
        Ok(Some((mark, changed))) => {
            let (data, _) = build_data(name, cfg, &mark.objects);
            if data.entries.is_empty() {
                return Err(GraphError::Empty(cfg.graph_url.clone()));
            }
            Ok(Synced::Incremental {
                data,
                mark,
                changed,
            })
        }
        Err(e) if sync_state_lost(&e) => {
            tracing::warn!(source = %name, error = %e, "{name}: delta token refused ({e}); full sync");
            full(name, cfg, now, progress).map(|(d, m)| Synced::Full(d, m))
        }
        Err(e) => Err(e),
    }
}

/// Apply `/users/delta` and `/groups/delta` from the mark's links: `None` when nothing
/// changed; else the new mark and how many objects changed.
fn incremental(cfg: &GraphConfig, m: &DeltaMark) -> Result<Option<(DeltaMark, u64)>, GraphError> {
    let mut c = Client::new(cfg)?;
    let mut changes: Vec<(String, Option<Map<String, Value>>)> = Vec::new();
    let mut links = Vec::new();
    for (kind, link, permission) in [
        ("users", &m.users, "User.Read.All"),
        ("groups", &m.groups, "Group.Read.All"),
    ] {
        let Some(link) = link else { continue };
        let next = c.pages(
            link,
            false,
            &format!("/{kind}/delta"),
            permission,
            |o| {
                let Some(id) = o.get("id").and_then(Value::as_str).map(str::to_owned) else {
                    return;
                };
                let key = format!("{kind}/{id}");
                if o.contains_key("@removed") {
                    changes.push((key, None));
                } else {
                    changes.push((key, Some(o)));
                }
            },
            || {},
        )?;
        links.push(next.ok_or_else(|| GraphError::Format {
            url: link.clone(),
            detail: "the last delta page has no @odata.deltaLink".into(),
        })?);
    }
    if changes.is_empty() {
        let mut same = m.clone();
        same.users = links.first().cloned().or(same.users);
        same.groups = links.get(1).cloned().or(same.groups);
        return if same.users == m.users && same.groups == m.groups {
            Ok(None)
        } else {
            // Nothing changed, but the links moved on: keep the new ones.
            Ok(Some((same, 0)))
        };
    }
    let mut mark = m.clone();
    mark.users = links.first().cloned();
    mark.groups = links.get(1).cloned();
    let changed = changes.len() as u64;
    for (key, o) in changes {
        match o {
            None => {
                mark.objects.remove(&key);
            }
            // Properties in the answer replace those kept; the others stay.
            Some(o) => {
                let e = mark.objects.entry(key).or_default();
                for (k, v) in o {
                    e.insert(k, v);
                }
            }
        }
    }
    Ok(Some((mark, changed)))
}

/// One object found: (`users/ID` or `groups/ID`, the object).
pub type Found = (String, Map<String, Value>);

/// Fetch one object for provision on demand: a user by ID or user principal name, else a
/// user or group by `mail`, else a user by proxy address. `(users/ID or groups/ID, object)`.
pub fn fetch_object(cfg: &GraphConfig, object: &str) -> Result<Option<Found>, GraphError> {
    let mut c = Client::new(cfg)?;
    let quoted = object.replace('\'', "''");
    let direct = c.url(&format!(
        "users/{}?$select={USER_FIELDS}",
        encode_query(object)
    ));
    match c.get(&direct, false, "/users", "User.Read.All") {
        Ok(Value::Object(o)) => {
            if let Some(id) = o.get("id").and_then(Value::as_str) {
                return Ok(Some((format!("users/{id}"), o.clone())));
            }
        }
        Ok(_) => {}
        Err(GraphError::Http {
            status: 404 | 400, ..
        }) => {}
        Err(e) => return Err(e),
    }
    let tries = [
        (
            "users",
            USER_FIELDS,
            format!("mail eq '{quoted}'"),
            false,
            "User.Read.All",
        ),
        (
            "groups",
            GROUP_FIELDS,
            format!("mail eq '{quoted}'"),
            false,
            "Group.Read.All",
        ),
        (
            "users",
            USER_FIELDS,
            format!("proxyAddresses/any(p:p eq 'smtp:{quoted}')"),
            true,
            "User.Read.All",
        ),
    ];
    for (kind, fields, filter, advanced, permission) in tries {
        let mut url = c.url(&format!(
            "{kind}?$select={fields}&$filter={}",
            encode_query(&filter)
        ));
        if advanced {
            url.push_str("&$count=true");
        }
        let v = c.get(&url, advanced, &format!("/{kind}"), permission)?;
        if let Some(Value::Object(o)) = v["value"].as_array().and_then(|a| a.first())
            && let Some(id) = o.get("id").and_then(Value::as_str)
        {
            return Ok(Some((format!("{kind}/{id}"), o.clone())));
        }
    }
    Ok(None)
}

/// `rcptgate graph-test`: each step the "Test" button of a directory-sync service takes —
/// the token, each permission exercised, the objects with addresses, five mapped samples, and
/// the secret's expiry when the app may read its own registration.
pub fn test(name: &Arc<str>, cfg: &GraphConfig) -> Vec<super::ldap_check::Step> {
    use super::ldap_check::{Status, Step};
    let step = |status, name, detail: String, fix: Option<String>| Step {
        status,
        name,
        detail,
        fix,
    };
    let mut out = Vec::new();
    let mut c = match Client::new(cfg) {
        Ok(c) => c,
        Err(e) => {
            out.push(step(Status::Fail, "setup", e.to_string(), None));
            return out;
        }
    };
    match c.token() {
        Ok(_) => out.push(step(
            Status::Ok,
            "token",
            format!(
                "client-credentials token for {} from {} ({})",
                cfg.client_id,
                cfg.authority,
                c.token_expires_in
                    .map_or("cached".to_owned(), |s| format!("valid {} min", s / 60))
            ),
            None,
        )),
        Err(e) => {
            let (detail, fix) = match &e {
                GraphError::Auth { detail, fix } => (detail.clone(), fix.clone()),
                other => (other.to_string(), None),
            };
            out.push(step(Status::Fail, "token", detail, fix));
            return out;
        }
    }
    let probes = [
        ("users", "User.Read.All", "users?$select=id&$top=1"),
        ("groups", "Group.Read.All", "groups?$select=id&$top=1"),
    ];
    let mut group_id = None;
    for (what, perm, path) in probes {
        let url = c.url(path);
        match c.get(&url, false, &format!("/{what}"), perm) {
            Ok(v) => {
                if what == "groups" {
                    group_id = v["value"][0]["id"].as_str().map(str::to_owned);
                }
                out.push(step(
                    Status::Ok,
                    "permission",
                    format!("{perm}: /{what} readable"),
                    None,
                ));
            }
            Err(e) => out.push(step(
                Status::Fail,
                "permission",
                e.to_string(),
                Some(format!(
                    "add the application permission {perm} and grant admin consent"
                )),
            )),
        }
    }
    if let Some(id) = group_id {
        let url = c.url(&format!("groups/{id}/members?$select=id&$top=1"));
        match c.get(&url, false, "/groups/{id}/members", "GroupMember.Read.All") {
            Ok(_) => out.push(step(Status::Ok, "permission", "GroupMember.Read.All: group members readable".into(), None)),
            Err(e) => out.push(step(
                Status::Warn,
                "permission",
                e.to_string(),
                Some("add GroupMember.Read.All (group membership is not needed for addresses, but for group-based scoping)".into()),
            )),
        }
    }
    let url = c.url("organization?$select=id,displayName,verifiedDomains");
    match c.get(&url, false, "/organization", "Directory.Read.All") {
        Ok(v) => {
            let domains: Vec<&str> = v["value"][0]["verifiedDomains"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d["name"].as_str()).collect())
                .unwrap_or_default();
            out.push(step(
                Status::Ok,
                "permission",
                format!(
                    "Directory.Read.All: tenant {:?}, verified domains: {}",
                    v["value"][0]["displayName"].as_str().unwrap_or("?"),
                    domains.join(", ")
                ),
                None,
            ));
        }
        Err(e) => out.push(step(
            Status::Warn,
            "permission",
            e.to_string(),
            Some("add Directory.Read.All to read the tenant's verified domains".into()),
        )),
    }
    if out.iter().any(|s| s.status == Status::Fail) {
        return out;
    }
    let started = Instant::now();
    match full(name, cfg, 0, |_| {}) {
        Ok((data, mark)) => {
            let users = mark
                .objects
                .keys()
                .filter(|k| k.starts_with("users/"))
                .count();
            let groups = mark.objects.len() - users;
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for e in &data.entries {
                *kinds.entry(e.kind.as_str()).or_default() += 1;
            }
            out.push(step(
                Status::Ok,
                "sync",
                format!(
                    "{users} users and {groups} mail-enabled groups read in {:.1} s: {} addresses ({})",
                    started.elapsed().as_secs_f64(),
                    data.entries.len(),
                    kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
                ),
                None,
            ));
            for e in data.entries.iter().filter(|e| e.owner.is_none()).take(5) {
                out.push(step(
                    Status::Ok,
                    "sample",
                    format!(
                        "{}@{} {} ({})",
                        e.local,
                        e.domain,
                        e.kind.as_str(),
                        e.dn.as_deref().unwrap_or("")
                    ),
                    None,
                ));
            }
        }
        Err(e) => out.push(step(Status::Fail, "sync", e.to_string(), None)),
    }
    let url = c.url(&format!(
        "applications(appId='{}')?$select=displayName,passwordCredentials,keyCredentials",
        cfg.client_id
    ));
    match c.get(&url, false, "/applications", "Application.Read.All") {
        Ok(v) => {
            let ends: Vec<String> = v["passwordCredentials"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(v["keyCredentials"].as_array().into_iter().flatten())
                .filter_map(|c| c["endDateTime"].as_str().map(str::to_owned))
                .collect();
            out.push(step(
                Status::Ok,
                "expiry",
                if ends.is_empty() {
                    "no credential end dates listed".into()
                } else {
                    format!("credentials end: {}", ends.join(", "))
                },
                None,
            ));
        }
        Err(_) => out.push(step(
            Status::Warn,
            "expiry",
            "the secret's expiry is not readable (needs Application.Read.All on the app); check it in the app registration".into(),
            None,
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GraphConfig {
        GraphConfig::new(
            "t",
            "c",
            Credential::Secret(PasswordSource::Env("X".into())),
        )
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn objects_map_like_active_directory() {
        let mut objects = HashMap::new();
        objects.insert(
            "users/1".to_owned(),
            obj(serde_json::json!({"id":"1","mail":"alice@contoso.com","userPrincipalName":"alice@contoso.onmicrosoft.com",
                "accountEnabled":true,"userType":"Member",
                "proxyAddresses":["SMTP:alice@contoso.com","smtp:a@contoso.com","X500:/o=x","SIP:alice@contoso.com"]})),
        );
        objects.insert(
            "users/2".to_owned(),
            obj(serde_json::json!({"id":"2","mail":"info@contoso.com","accountEnabled":false,"userType":"Member","proxyAddresses":["SMTP:info@contoso.com"]})),
        );
        objects.insert(
            "users/3".to_owned(),
            obj(serde_json::json!({"id":"3","mail":"guest@other.example","accountEnabled":true,"userType":"Guest","proxyAddresses":[]})),
        );
        objects.insert(
            "users/4".to_owned(),
            obj(serde_json::json!({"id":"4","mail":null,"userPrincipalName":"svc@contoso.com","accountEnabled":true,"userType":"Member","proxyAddresses":[]})),
        );
        objects.insert(
            "groups/5".to_owned(),
            obj(serde_json::json!({"id":"5","mail":"sales@contoso.com","mailEnabled":true,"proxyAddresses":["SMTP:sales@contoso.com"]})),
        );
        objects.insert(
            "groups/6".to_owned(),
            obj(serde_json::json!({"id":"6","mail":null,"mailEnabled":false,"securityEnabled":true})),
        );
        let name: Arc<str> = Arc::from("entra");
        let (data, skipped) = build_data(&name, &cfg(), &objects);
        let got: Vec<(String, &str)> = data
            .entries
            .iter()
            .map(|e| (format!("{}@{}", e.local, e.domain), e.kind.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("sales@contoso.com".to_owned(), "group"),
                ("alice@contoso.com".to_owned(), "user"),
                ("a@contoso.com".to_owned(), "alias"),
                ("info@contoso.com".to_owned(), "shared"),
            ]
        );
        assert_eq!(skipped.get("guest (include_guests = false)"), Some(&1));
        assert_eq!(skipped.get("group not mail-enabled"), Some(&1));
        assert_eq!(skipped.get("no mail address"), Some(&1));
        let mut c = cfg();
        c.include_disabled = false;
        c.include_guests = true;
        let (data, _) = build_data(&name, &c, &objects);
        assert!(data.entries.iter().any(|e| &*e.domain == "other.example"));
        assert!(!data.entries.iter().any(|e| e.local == "info"));
    }

    #[test]
    fn aadsts_codes_say_what_to_fix() {
        assert_eq!(
            aadsts_in("AADSTS7000215: Invalid client secret provided."),
            Some(7000215)
        );
        assert!(aadsts_fix(7000222).is_some_and(|f| f.contains("expired")));
        assert!(aadsts_fix(90002).is_some_and(|f| f.contains("tenant_id")));
        assert!(aadsts_fix(700016).is_some_and(|f| f.contains("client_id")));
        assert_eq!(aadsts_fix(1), None);
    }

    #[test]
    fn filters_that_need_advanced_queries() {
        let mut c = cfg();
        let client = Client::new(&c).expect("client");
        assert!(!users_url(&client, &c).1);
        c.user_filter = Some("endsWith(mail,'@contoso.com')".into());
        let client = Client::new(&c).expect("client");
        let (url, adv) = users_url(&client, &c);
        assert!(
            adv && url.contains("$count=true") && url.contains("endsWith(mail%2C'%40contoso.com')"),
            "{url}"
        );
        c.user_filter = Some("accountEnabled eq true".into());
        let client = Client::new(&c).expect("client");
        assert!(!users_url(&client, &c).1);
    }
}
