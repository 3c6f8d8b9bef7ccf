//! The syslog audit sink against Debian's rsyslog (`rsyslog` + `rsyslog-gnutls`, which
//! `.ci/run` installs): RFC 5424 over TLS with octet counting, received by rsyslog's own
//! imtcp/gtls and written by its omfile to a file this test reads. rsyslog is stopped
//! (SIGTERM) while entries are committed, then started again: it gets each entry once.

use crate::audit_sinks::{committed, drain, issue, log_size, shipper};
use crate::common;
use common::pki::{pki, write};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spiffe_broker::config::{SinkKind, SinkTls};
use spiffe_broker::store::export::ExportEntry;

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// rsyslogd in the foreground with a config of its own: a TLS imtcp listener on `port`,
/// every message written as `MSGID STRUCTURED-DATA MSG` to `received.log`.
struct Rsyslog {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Rsyslog {
    async fn start(dir: &Path, port: u16, pki: &common::pki::Pki) -> Self {
        assert!(
            Path::new(RSYSLOGD).exists(),
            "{RSYSLOGD} missing: apt-get install rsyslog rsyslog-gnutls (.ci/run does)"
        );
        let ca = write(dir, "ca.pem", &pki.ca_pem);
        let cert = write(dir, "server.pem", &pki.cert_pem);
        let key = write(dir, "server.key", &pki.key_pem);
        let conf = format!(
            r#"global(workDirectory="{dir}" maxMessageSize="256k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="entry" type="string" string="%msgid% %structured-data% %msg%\n")
action(type="omfile" file="{dir}/received.log" template="entry" flushOnTXEnd="on" asyncWriting="off")
"#,
            dir = dir.display(),
            ca = ca.display(),
            cert = cert.display(),
            key = key.display(),
        );
        std::fs::write(dir.join("rsyslog.conf"), conf).expect("config");
        let mut r = Self {
            dir: dir.to_owned(),
            port,
            child: None,
        };
        r.run().await;
        r
    }

    async fn run(&mut self) {
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rsyslogd starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "rsyslogd listens");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, as an operator's restart does; waits for the exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// What rsyslog wrote, by sequence: how often, and the entry.
    fn received(&self) -> BTreeMap<u64, (usize, ExportEntry)> {
        let text = std::fs::read_to_string(self.dir.join("received.log")).unwrap_or_default();
        let mut got = BTreeMap::new();
        for line in text.lines() {
            // `issue [audit@32473 seq="7" hash="…"] {"seq":7,…}`
            let (_, entry) = line.split_once("] ").expect("MSGID SD MSG");
            let entry: ExportEntry = serde_json::from_str(entry.trim()).expect("the entry as JSON");
            let (kind, sd) = line.split_once(' ').expect("MSGID");
            assert_eq!(kind, entry.kind, "MSGID is the kind");
            assert!(
                sd.starts_with(&format!(
                    "[audit@32473 seq=\"{}\" hash=\"{}\"]",
                    entry.seq, entry.hash
                )),
                "{sd}"
            );
            got.entry(entry.seq).or_insert((0, entry)).0 += 1;
        }
        got
    }

    /// Waits (bounded) until rsyslog has written `size` distinct entries.
    async fn wait_for(&self, size: u64) -> BTreeMap<u64, (usize, ExportEntry)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.received();
            if got.len() as u64 >= size || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn rsyslog_over_tls_gets_every_entry_once_across_its_restart() {
    let h = common::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(&["localhost"]);
    let port = free_port();
    let mut rsyslog = Rsyslog::start(dir.path(), port, &pki).await;
    let kind = SinkKind::Syslog {
        address: format!("127.0.0.1:{port}"),
        tls: Some(SinkTls {
            ca_file: Some(dir.path().join("ca.pem")),
            server_name: "localhost".into(),
        }),
        facility: 10,
        hostname: "broker-test".into(),
    };
    let mut s = shipper(&h, "rsyslog", kind, "a");
    issue(&h, 2).await;
    drain(&mut s).await;
    let size = log_size(&h).await;
    assert_eq!(rsyslog.wait_for(size).await.len() as u64, size);

    // rsyslog goes away; entries are committed meanwhile; delivery fails and the
    // position stays where it was.
    rsyslog.stop();
    issue(&h, 3).await;
    assert!(s.pass().await.is_err(), "rsyslog is down");
    assert!(s.pass().await.is_err(), "still down");
    rsyslog.run().await;
    drain(&mut s).await;
    let size = log_size(&h).await;
    let got = rsyslog.wait_for(size).await;
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (1..=size).collect::<Vec<_>>(),
        "every entry"
    );
    assert!(got.values().all(|(n, _)| *n == 1), "each exactly once");
    for e in committed(&h).await {
        assert_eq!(got[&e.seq].1.body, e.body, "the entry as committed");
    }

    // A certificate for another name is refused by the sink.
    let wrong = SinkKind::Syslog {
        address: format!("127.0.0.1:{port}"),
        tls: Some(SinkTls {
            ca_file: Some(dir.path().join("ca.pem")),
            server_name: "logs.example".into(),
        }),
        facility: 10,
        hostname: "broker-test".into(),
    };
    let mut other = shipper(&h, "wrong-name", wrong, "a");
    let e = other.pass().await.expect_err("name mismatch");
    assert!(e.to_string().contains("certificate"), "{e}");
}
