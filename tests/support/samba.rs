//! A throwaway Samba Active Directory domain controller (LDAP service only) on 127.0.0.1:
//! domain CORP.TEST, provisioned into a temp dir with its own CA and LDAPS certificate, run
//! in the foreground (`samba -i -M single`). Real AD behaviour: UPN binds, bind error 49
//! with "data 52e", uSNChanged / highestCommittedUSN. Needs root and Debian's `samba`,
//! `samba-ad-dc`, `samba-ad-provision`, `samba-dsdb-modules`, `ldap-utils`, `openssl`.
//! LDAP ports are Samba's fixed 389/636: one DC at a time.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_DN: &str = "CN=Administrator,CN=Users,DC=corp,DC=test";
pub const ADMIN_PW: &str = "Passw0rd!Adm1n";

pub struct Samba {
    pub dir: PathBuf,
    pub ca: PathBuf,
    child: Option<Child>,
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

impl Samba {
    /// Provision and start a DC in `dir`; the PKI comes from `pki` (see slapd::make_pki).
    pub fn start(dir: &Path, pki: &Path) -> Samba {
        let dc = dir.join("dc");
        let _ = std::fs::remove_dir_all(&dc);
        std::fs::create_dir_all(&dc).expect("dc dir");
        sh(Command::new("chmod").arg("600").arg(pki.join("server.key")));
        let opt = |k: &str, v: String| format!("--option={k}={v}");
        sh(Command::new("samba-tool")
            .args([
                "domain",
                "provision",
                "--use-rfc2307",
                "--realm=CORP.TEST",
                "--domain=CORP",
                "--server-role=dc",
                "--dns-backend=NONE",
                "--host-name=dc1",
            ])
            .arg(format!("--adminpass={ADMIN_PW}"))
            .arg(format!("--targetdir={}", dc.display()))
            .arg(opt("interfaces", "127.0.0.1".into()))
            .arg(opt("bind interfaces only", "yes".into()))
            .arg(opt("server services", "ldap".into()))
            .arg(opt("tls enabled", "yes".into()))
            .arg(opt(
                "tls keyfile",
                pki.join("server.key").display().to_string(),
            ))
            .arg(opt(
                "tls certfile",
                pki.join("server.pem").display().to_string(),
            ))
            .arg(opt("tls cafile", pki.join("ca.pem").display().to_string()))
            .arg(opt("ldb:nosync", "true".into()))
            .arg(opt("log file", dc.join("log.samba").display().to_string()))
            .arg(opt("pid directory", dc.display().to_string())));
        let child = Command::new("samba")
            .args(["-i", "-M", "single", "-s"])
            .arg(dc.join("etc/smb.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start samba");
        let mut s = Samba {
            dir: dir.to_path_buf(),
            ca: pki.join("ca.pem"),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = Command::new("ldapsearch")
                .env("LDAPTLS_CACERT", &s.ca)
                .args([
                    "-x",
                    "-H",
                    "ldaps://127.0.0.1",
                    "-b",
                    "",
                    "-s",
                    "base",
                    "dnsHostName",
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return s;
            }
            if Instant::now() > deadline
                || s.child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                panic!(
                    "samba did not come up (see {})",
                    dc.join("log.samba").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Apply LDIF (adds and changes) as the domain administrator.
    pub fn modify(&self, ldif: &str) {
        let path = self.dir.join("change.ldif");
        std::fs::write(&path, ldif).expect("ldif");
        sh(Command::new("ldapmodify")
            .env("LDAPTLS_CACERT", &self.ca)
            .args([
                "-x",
                "-H",
                "ldaps://127.0.0.1",
                "-D",
                ADMIN_DN,
                "-w",
                ADMIN_PW,
                "-f",
            ])
            .arg(&path));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Samba {
    fn drop(&mut self) {
        self.stop();
    }
}

/// AD's unicodePwd value: the quoted password in UTF-16LE, base64 (for `unicodePwd::`).
pub fn unicode_pwd(pw: &str) -> String {
    use base64::Engine;
    let quoted: Vec<u8> = format!("\"{pw}\"")
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(quoted)
}
