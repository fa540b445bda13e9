//! A throwaway OpenLDAP slapd that looks like Active Directory (the AD attribute names and
//! OIDs from `ad-mini.schema`) on loopback, with its own CA and an LDAPS certificate, and
//! AD's 1000-entry limit on unpaged searches. Needs Debian's `slapd`, `ldap-utils` and
//! `openssl`. Shared by the LDAP tests and the sync benchmark.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const BASE: &str = "DC=corp,DC=test";
pub const OU: &str = "OU=AADDC Users,DC=corp,DC=test";
pub const SVC_DN: &str = "CN=svc-smtp,OU=AADDC Users,DC=corp,DC=test";
pub const SVC_PW: &str = "Svc!Passw0rd1";
const ROOT_DN: &str = "CN=Manager,DC=corp,DC=test";
const ROOT_PW: &str = "secret";

/// A loopback port nothing listens on (for a while).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Make a CA and a server certificate for localhost / 127.0.0.1 in `dir` (CN `name`).
pub fn make_pki(dir: &Path, name: &str) {
    make_pki_days(dir, name, 825);
}

/// The same, with a server certificate valid for `days`.
pub fn make_pki_days(dir: &Path, name: &str, days: u32) {
    let days = days.to_string();
    std::fs::create_dir_all(dir).expect("pki dir");
    let o = |args: &[&str]| sh(Command::new("openssl").current_dir(dir).args(args));
    o(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "3650",
        "-sha256",
        "-subj",
        &format!("/CN={name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    o(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext");
    o(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        &days,
        "-sha256",
        "-extfile",
        "server.ext",
    ]);
}

/// A running slapd; stopped on drop.
pub struct Slapd {
    pub dir: PathBuf,
    /// LDAPS port (and plain LDAP, for StartTLS).
    pub port: u16,
    pub plain_port: u16,
    pub ca: PathBuf,
    pid: Option<u32>,
}

impl Slapd {
    /// Start slapd in `dir` with `ldif` loaded (slapadd: fast for 100k entries). A PKI
    /// already in `dir/pki` is used as it is.
    pub fn start(dir: &Path, ldif: &str) -> Slapd {
        std::fs::create_dir_all(dir.join("db")).expect("db dir");
        if !dir.join("pki/server.pem").exists() {
            make_pki(&dir.join("pki"), "Test LDAP CA");
        }
        let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/ad-mini.schema");
        let d = dir.display();
        let conf = format!(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
include /etc/ldap/schema/inetorgperson.schema\ninclude {schema}\npidfile {d}/slapd.pid\n\
argsfile {d}/slapd.args\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\nloglevel none\n\
TLSCACertificateFile {d}/pki/ca.pem\nTLSCertificateFile {d}/pki/server.pem\n\
TLSCertificateKeyFile {d}/pki/server.key\n\
sizelimit size.soft=1000 size.hard=1000 size.prtotal=unlimited\ndisallow bind_anon\nrequire authc\n\
database mdb\nmaxsize 4294967296\nsuffix \"{BASE}\"\nrootdn \"{ROOT_DN}\"\nrootpw {ROOT_PW}\n\
directory {d}/db\nindex objectClass eq\nindex mail,proxyAddresses eq\n\
access to attrs=userPassword by anonymous auth by self read by * none\n\
access to * by users read by * none\n"
        );
        std::fs::write(dir.join("slapd.conf"), conf).expect("slapd.conf");
        std::fs::write(dir.join("load.ldif"), ldif).expect("ldif");
        sh(Command::new("slapadd")
            .args(["-q", "-f"])
            .arg(dir.join("slapd.conf"))
            .arg("-l")
            .arg(dir.join("load.ldif")));
        let mut s = Slapd {
            dir: dir.to_path_buf(),
            port: free_port(),
            plain_port: free_port(),
            ca: dir.join("pki/ca.pem"),
            pid: None,
        };
        s.run();
        s
    }

    /// (Re)start the server on its ports, with its data.
    pub fn run(&mut self) {
        sh(Command::new("slapd")
            .arg("-f")
            .arg(self.dir.join("slapd.conf"))
            .arg("-h")
            .arg(format!(
                "ldaps://127.0.0.1:{}/ ldap://127.0.0.1:{}/",
                self.port, self.plain_port
            )));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("slapd.pid"))
                && self.whoami()
            {
                self.pid = pid.trim().parse().ok();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("slapd did not come up in {}", self.dir.display());
    }

    fn whoami(&self) -> bool {
        Command::new("ldapwhoami")
            .env("LDAPTLS_CACERT", &self.ca)
            .args(["-x", "-H", &self.url(), "-D", ROOT_DN, "-w", ROOT_PW])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    pub fn url(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.port)
    }

    /// Apply an LDIF change (ldapmodify) as the directory manager.
    pub fn modify(&self, ldif: &str) {
        let path = self.dir.join("change.ldif");
        std::fs::write(&path, ldif).expect("change");
        sh(Command::new("ldapmodify")
            .env("LDAPTLS_CACERT", &self.ca)
            .args(["-x", "-H", &self.url(), "-D", ROOT_DN, "-w", ROOT_PW, "-f"])
            .arg(&path));
    }

    /// Freeze the server (SIGSTOP): connections hang, as with a server that stops
    /// answering mid-sync. `resume` lets it go on.
    pub fn pause(&self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status();
        }
    }

    pub fn resume(&self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }

    pub fn stop(&mut self) {
        self.resume();
        let Some(pid) = self.pid.take() else { return };
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && Command::new("kill")
                .args(["-0", &pid.to_string()])
                .output()
                .is_ok_and(|o| o.status.success())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// AD-like LDIF under `OU=AADDC Users` (the Azure AD DS layout): `users` users with a
/// primary (`SMTP:`) and two alias (`smtp:`) proxyAddresses, X500/SIP noise on every 10th,
/// every 50th disabled with mail (a shared mailbox), every 100th without mail; `groups`
/// mail-enabled groups; `contacts` external contacts; the bind account; and
/// `OU=Out Of Scope` holding one mail user that must never be synced.
pub fn ad_ldif(users: usize, groups: usize, contacts: usize) -> String {
    use std::fmt::Write;
    let mut w = String::new();
    let _ = write!(
        w,
        "dn: {BASE}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\ndc: corp\no: corp.test\n\n\
dn: {OU}\nobjectClass: top\nobjectClass: organizationalUnit\nou: AADDC Users\n\n\
dn: OU=Out Of Scope,{BASE}\nobjectClass: top\nobjectClass: organizationalUnit\nou: Out Of Scope\n\n\
dn: OU=Empty,{BASE}\nobjectClass: top\nobjectClass: organizationalUnit\nou: Empty\n\n\
dn: CN=Hidden User,OU=Out Of Scope,{BASE}\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\nobjectClass: user\n\
cn: Hidden User\nsn: hidden\nmail: hidden@corp.test\nproxyAddresses: SMTP:hidden@corp.test\nuserAccountControl: 512\n\n\
dn: {SVC_DN}\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\nobjectClass: user\n\
cn: svc-smtp\nsn: svc-smtp\nsAMAccountName: svc-smtp\nuserPrincipalName: svc-smtp@corp.test\n\
userPassword: {SVC_PW}\nuserAccountControl: 66048\n\n"
    );
    for i in 1..=users {
        let _ = write!(
            w,
            "dn: CN=User {i:06},{OU}\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\nobjectClass: user\n\
cn: User {i:06}\nsn: user{i}\nsAMAccountName: u{i:06}\nuserPrincipalName: u{i:06}@corp.test\nuserAccountControl: {}\n",
            if i % 50 == 0 { 546 } else { 512 }
        );
        if i % 100 != 0 {
            let _ = write!(
                w,
                "mail: user.{i}@corp.test\nproxyAddresses: SMTP:user.{i}@corp.test\n\
proxyAddresses: smtp:u{i:06}@corp.test\nproxyAddresses: smtp:user.{i}@alias.test\n"
            );
            if i % 10 == 0 {
                let _ = write!(
                    w,
                    "proxyAddresses: X500:/o=ExchangeLabs/ou=Exchange Administrative Group/cn=Recipients/cn=u{i:06}\n\
proxyAddresses: SIP:user.{i}@corp.test\n"
                );
            }
        }
        w.push('\n');
    }
    for g in 1..=groups {
        let _ = write!(
            w,
            "dn: CN=Group {g:05},{OU}\nobjectClass: top\nobjectClass: group\ncn: Group {g:05}\n\
sAMAccountName: grp{g:05}\ngroupType: 8\nmail: grp{g:05}@corp.test\n\
proxyAddresses: SMTP:grp{g:05}@corp.test\nproxyAddresses: smtp:grp{g:05}@alias.test\n\n"
        );
    }
    for c in 1..=contacts {
        let _ = write!(
            w,
            "dn: CN=Contact {c:05},{OU}\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\nobjectClass: contact\n\
cn: Contact {c:05}\nsn: ext{c}\nmail: ext{c}@partner.test\nproxyAddresses: SMTP:ext{c}@partner.test\n\n"
        );
    }
    w
}
