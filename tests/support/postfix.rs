//! A private Postfix instance on loopback (Debian's package): its own config, queue and data
//! directories, nothing ever delivered (`default_transport = discard:`). Shared by
//! tests/postfix.rs and benches/postfix_e2e.rs; needs root and the `postfix` package.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RELAY_DOMAINS: &str = "contoso.com, contoso.de, xn--mnchen-contoso-gsb.de, fabrikam.com, fabrikam-lab.com, unknown-tenant.example";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private Postfix instance on 127.0.0.1:`port`; stopped on drop.
pub struct Postfix {
    pub base: PathBuf,
    pub port: u16,
}

impl Postfix {
    /// Relaying for the example directory's domains; `restrictions` are extra main.cf lines.
    pub fn start(base: &Path, restrictions: &[&str]) -> Postfix {
        Self::start_for(base, RELAY_DOMAINS, restrictions)
    }

    pub fn start_for(base: &Path, relay_domains: &str, restrictions: &[&str]) -> Postfix {
        let port = free_port();
        for d in ["etc", "spool", "data", "log"] {
            std::fs::create_dir_all(base.join(d)).expect("mkdir");
        }
        run(Command::new("chown")
            .arg("postfix:postfix")
            .arg(base.join("data")));
        let b = base.display();
        let parent = base.parent().unwrap_or(base).display();
        let mut main = format!(
            "compatibility_level = 3.6\nqueue_directory = {b}/spool\ndata_directory = {b}/data\n\
mail_owner = postfix\nsetgid_group = postdrop\nmaillog_file_prefixes = {parent}\n\
maillog_file = {b}/log/maillog\nmyhostname = mx.rcptgate.test\nmydomain = rcptgate.test\n\
mydestination =\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmynetworks = 127.0.0.2/32\n\
alias_maps =\nalias_database =\nlocal_recipient_maps =\nrelay_domains = {relay_domains}\n\
default_transport = discard:\nrelay_transport = discard:\nlocal_transport = error:disabled\n\
smtpd_relay_restrictions = reject_unauth_destination\nin_flow_delay = 0\n\
smtpd_error_sleep_time = 0\nsmtpd_soft_error_limit = 1000000\nsmtpd_hard_error_limit = 1000000\n\
smtpd_junk_command_limit = 1000000\nsmtpd_client_connection_count_limit = 0\n\
relay_recipient_maps =\nsmtpd_recipient_restrictions =\n"
        );
        for line in restrictions {
            main.push_str(line);
            main.push('\n');
        }
        std::fs::write(base.join("etc/main.cf"), main).expect("main.cf");
        let master = format!(
            "127.0.0.1:{port} inet n - n - - smtpd\n\
pickup unix n - n 60 1 pickup\ncleanup unix n - n - 0 cleanup\nqmgr unix n - n 300 1 qmgr\n\
rewrite unix - - n - - trivial-rewrite\nbounce unix - - n - 0 bounce\n\
defer unix - - n - 0 bounce\ntrace unix - - n - 0 bounce\nverify unix - - n - 1 verify\n\
proxymap unix - - n - - proxymap\nerror unix - - n - - error\nretry unix - - n - - error\n\
discard unix - - n - - discard\nsmtp unix - - n - - smtp\nanvil unix - - n - 1 anvil\n\
scache unix - - n - 1 scache\npostlog unix-dgram n - n - 1 postlogd\n\
tlsmgr unix - - n 1000? 1 tlsmgr\nflush unix n - n 1000? 0 flush\n"
        );
        std::fs::write(base.join("etc/master.cf"), master).expect("master.cf");
        run(Command::new("postfix")
            .arg("-c")
            .arg(base.join("etc"))
            .arg("check"));
        run(Command::new("postfix")
            .arg("-c")
            .arg(base.join("etc"))
            .arg("start"));
        let pf = Postfix {
            base: base.to_path_buf(),
            port,
        };
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return pf;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("postfix did not start: {}", pf.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.base.join("log/maillog")).unwrap_or_default()
    }

    /// One SMTP session: the reply line to each RCPT TO.
    pub fn rcpt(&self, recipients: &[&str]) -> Vec<String> {
        let (replies, _) = self.session(recipients, None);
        assert_eq!(replies.len(), recipients.len(), "MAIL refused: {replies:?}");
        replies
    }

    /// One SMTP session to `recipients`, and with `message` its DATA when one was accepted:
    /// the reply to each RCPT (or, when MAIL is not answered 250, that reply alone), and the
    /// reply to the end of DATA.
    pub fn session(
        &self,
        recipients: &[&str],
        message: Option<&str>,
    ) -> (Vec<String>, Option<String>) {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut w = s;
        // The last line of a (possibly multi-line) reply.
        let reply = |r: &mut BufReader<TcpStream>| -> String {
            loop {
                let mut line = String::new();
                r.read_line(&mut line).expect("reply");
                if line.as_bytes().get(3) != Some(&b'-') || line.is_empty() {
                    return line.trim_end().to_owned();
                }
            }
        };
        assert!(reply(&mut r).starts_with("220"));
        write!(w, "EHLO client.example\r\n").expect("write");
        assert!(reply(&mut r).starts_with("250"));
        write!(w, "MAIL FROM:<sender@example.net>\r\n").expect("write");
        let mail = reply(&mut r);
        if !mail.starts_with("250") {
            return (vec![mail], None);
        }
        let mut out = Vec::new();
        for rcpt in recipients {
            write!(w, "RCPT TO:<{rcpt}>\r\n").expect("write");
            out.push(reply(&mut r));
        }
        let mut end = None;
        if let Some(message) = message.filter(|_| out.iter().any(|o| o.starts_with("250"))) {
            write!(w, "DATA\r\n").expect("write");
            assert!(reply(&mut r).starts_with("354"));
            write!(w, "{message}\r\n.\r\n").expect("write");
            end = Some(reply(&mut r));
        }
        write!(w, "QUIT\r\n").expect("write");
        (out, end)
    }

    pub fn postmap_q(&self, key: &str, table: &str) -> (bool, String) {
        let out = Command::new("postmap")
            .arg("-c")
            .arg(self.base.join("etc"))
            .args(["-q", key, table])
            .output()
            .expect("postmap");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.base.join("etc"))
            .arg("stop")
            .output();
    }
}
