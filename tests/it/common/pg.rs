//! A throwaway PostgreSQL server for a test: `initdb` + `postgres` from
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package) on a free loopback port,
//! data and socket directories in a tempdir, stopped (fast shutdown) on drop.
//!
//! With `SPIFFE_BROKER_TEST_PG_URL` set, tests use that server instead, each in a fresh
//! database of its own (dropped afterwards); such a server cannot be stopped by a test.
//!
//! Everything here blocks; the sync `postgres` client runs on threads of its own, so these
//! functions may be called from async tests too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where Debian installs the server binaries, one directory per major version.
const PG_ROOT: &str = "/usr/lib/postgresql";

/// The env variable naming an existing server to use instead.
pub const URL_ENV: &str = "SPIFFE_BROKER_TEST_PG_URL";

static DATABASES: AtomicU32 = AtomicU32::new(0);

/// A database for one test.
pub struct PgServer {
    url: String,
    kind: Kind,
}

enum Kind {
    Local(Cluster),
    External { admin_url: String, db: String },
}

/// A cluster this test started.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Serves TLS (`ssl=on`) with `server.crt` / `server.key` in `dir`.
    ssl: bool,
    /// The `postgres` system user when the tests run as root (PostgreSQL refuses root).
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

/// A database on `SPIFFE_BROKER_TEST_PG_URL` if set, else on a new local cluster.
pub fn start() -> PgServer {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => external(&url),
        _ => local(),
    }
}

/// A new local cluster (tests that stop and start the server need their own).
pub fn local() -> PgServer {
    local_with(None)
}

/// A new local cluster serving TLS (`ssl=on`) with this certificate chain and key (PEM).
/// Plain connections are still accepted (the tests' own admin connections use them).
pub fn local_tls(cert_pem: &str, key_pem: &str) -> PgServer {
    local_with(Some((cert_pem, key_pem)))
}

fn local_with(tls: Option<(&str, &str)>) -> PgServer {
    let bin = server_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let run_as = if running_as_root() {
        let ids = postgres_user();
        std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1)).expect("chown tempdir");
        Some(ids)
    } else {
        None
    };
    std::fs::create_dir(dir.path().join("sock")).expect("socket dir");
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(dir.path().join("sock"), Some(uid), Some(gid)).expect("chown");
    }
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(dir.path().join("data"))
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"])
        .arg("--no-sync");
    let out = as_user(&mut initdb, run_as, dir.path())
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some((cert, key)) = tls {
        // PostgreSQL refuses a key readable by others: 0600, owned by the server's user.
        for (name, pem) in [("server.crt", cert), ("server.key", key)] {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write TLS file");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod TLS file");
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown TLS file");
            }
        }
    }
    let mut cluster = Cluster {
        dir,
        bin,
        port: 0,
        ssl: tls.is_some(),
        run_as,
        child: None,
    };
    // A free port can be taken between choosing and binding it: try a few.
    let mut last = String::new();
    for _ in 0..5 {
        cluster.port = free_port();
        match cluster.spawn() {
            Ok(()) => {
                let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
                admin(&url, "CREATE DATABASE broker");
                return PgServer {
                    url: format!("postgres://postgres@127.0.0.1:{}/broker", cluster.port),
                    kind: Kind::Local(cluster),
                };
            }
            Err(log) => last = log,
        }
    }
    panic!("PostgreSQL did not start:\n{last}");
}

fn external(url: &str) -> PgServer {
    let n = DATABASES.fetch_add(1, Ordering::SeqCst);
    let mut salt = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).expect("random");
    let db = format!("sb_test_{}_{n}_{}", std::process::id(), hex::encode(salt));
    admin(url, &format!("CREATE DATABASE {db}"));
    PgServer {
        url: with_dbname(url, &db),
        kind: Kind::External {
            admin_url: url.to_owned(),
            db,
        },
    }
}

impl PgServer {
    /// The test database's connection string.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The port of a local cluster (its database is `broker`, its user `postgres`).
    pub fn port(&self) -> u16 {
        match &self.kind {
            Kind::Local(c) => c.port,
            Kind::External { .. } => panic!("{URL_ENV} names a server, not a local cluster"),
        }
    }

    /// Fast shutdown of the server (a local cluster only).
    pub fn stop(&mut self) {
        match &mut self.kind {
            Kind::Local(c) => c.stop(),
            Kind::External { .. } => panic!("{URL_ENV} names a server this test cannot stop"),
        }
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn restart(&mut self) {
        match &mut self.kind {
            Kind::Local(c) => c
                .spawn()
                .unwrap_or_else(|log| panic!("PostgreSQL did not start again:\n{log}")),
            Kind::External { .. } => panic!("{URL_ENV} names a server this test cannot start"),
        }
    }

    /// Freezes (SIGSTOP) the server and its backends: connections stay up, nothing
    /// answers, as with a server stuck on its disk (a local cluster only).
    pub fn freeze(&self) {
        self.signal_all("-STOP");
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal_all("-CONT");
    }

    fn signal_all(&self, signal: &str) {
        let Kind::Local(c) = &self.kind else {
            panic!("{URL_ENV} names a server this test cannot freeze");
        };
        let Some(child) = &c.child else {
            panic!("the server is not running");
        };
        let mut pids = vec![child.id()];
        pids.extend(children_of(child.id()));
        let ok = Command::new("kill")
            .arg(signal)
            .args(pids.iter().map(u32::to_string))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} {pids:?}");
    }

    /// Puts `line` first in `pg_hba.conf` and reloads the configuration (a local cluster
    /// only): e.g. a `hostssl … scram-sha-256` line ahead of initdb's `trust` ones.
    pub fn hba_first(&self, line: &str) {
        let Kind::Local(c) = &self.kind else {
            panic!("{URL_ENV} names a server whose pg_hba.conf a test cannot change");
        };
        let path = c.dir.path().join("data").join("pg_hba.conf");
        let rules = std::fs::read_to_string(&path).expect("read pg_hba.conf");
        // Rewritten in place: the file keeps its owner (the server's user).
        std::fs::write(&path, format!("{line}\n{rules}")).expect("write pg_hba.conf");
        query(&self.url, "SELECT pg_reload_conf()");
        // The postmaster rereads the file on SIGHUP, a moment after the call returns.
        pause(Duration::from_millis(500));
    }

    /// Runs SQL on the test database (simple protocol; for checks and set-up).
    pub fn sql(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        query(&self.url, sql)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Kind::External { admin_url, db } = &self.kind {
            let _ = try_query(
                admin_url,
                &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            );
        }
    }
}

impl Cluster {
    /// Starts `postgres` and waits until it takes connections; on failure, its log.
    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join(format!("postgres-{}.log", self.port));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=50"])
            .args(if self.ssl {
                vec![
                    "-c".to_owned(),
                    "ssl=on".to_owned(),
                    "-c".to_owned(),
                    format!(
                        "ssl_cert_file={}",
                        self.dir.path().join("server.crt").display()
                    ),
                    "-c".to_owned(),
                    format!(
                        "ssl_key_file={}",
                        self.dir.path().join("server.key").display()
                    ),
                ]
            } else {
                Vec::new()
            })
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let mut child = as_user(&mut cmd, self.run_as, self.dir.path())
            .spawn()
            .expect("run postgres");
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
            self.port
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("postgres exited ({status}):\n{text}"));
            }
            if try_query(&url, "SELECT 1").is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("postgres not ready within 60 s:\n{text}"));
            }
            pause(Duration::from_millis(50));
        }
    }

    /// Fast shutdown (SIGINT): sessions are ended, the server exits cleanly.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let signalled = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !signalled {
            let _ = child.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            pause(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The processes whose parent is `pid` (the postmaster's backends and workers).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces, so read after the last ')'.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// The newest server's binaries, or a failure that names the package to install.
fn server_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(PG_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found ({PG_ROOT}/*/bin/initdb): install the Debian \
             package `postgresql` (apt-get install -y --no-install-recommends postgresql), or \
             set {URL_ENV} to a server the tests may create databases on"
        ),
    }
}

fn running_as_root() -> bool {
    // The owner of a file this process just created is its effective uid.
    let probe = tempfile::NamedTempFile::new().expect("probe file");
    use std::os::unix::fs::MetadataExt;
    probe.as_file().metadata().expect("metadata").uid() == 0
}

/// The uid and gid of the `postgres` system user (Debian's package creates it).
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres") && f.len() > 3)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .expect(
            "running as root, and there is no `postgres` user to run PostgreSQL as \
             (install the Debian package `postgresql`, which creates it)",
        )
}

/// Runs the command as `postgres` when we are root (PostgreSQL refuses to run as root),
/// from a directory that user may enter.
fn as_user<'a>(cmd: &'a mut Command, run_as: Option<(u32, u32)>, cwd: &Path) -> &'a mut Command {
    use std::os::unix::process::CommandExt;
    cmd.current_dir(cwd).env("LC_ALL", "C");
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits on a helper thread; never on an async executor.
#[allow(clippy::disallowed_methods)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// `url` with its database replaced by `db` (key=value form, which the broker accepts).
fn with_dbname(url: &str, db: &str) -> String {
    let cfg: postgres::Config = url.parse().expect("SPIFFE_BROKER_TEST_PG_URL parses");
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = Vec::new();
    if let Some(h) = cfg.get_hosts().first() {
        let host = match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        parts.push(format!("host={}", quote(&host)));
    }
    if let Some(port) = cfg.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    if let Some(user) = cfg.get_user() {
        parts.push(format!("user={}", quote(user)));
    }
    if let Some(pw) = cfg.get_password() {
        parts.push(format!("password={}", quote(&String::from_utf8_lossy(pw))));
    }
    parts.push(format!("dbname={}", quote(db)));
    parts.join(" ")
}

fn admin(url: &str, sql: &str) {
    if let Err(e) = try_query(url, sql) {
        panic!("{sql}: {e}");
    }
}

fn query(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    try_query(url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One connection, one simple query, on a thread of its own (the sync client must not run
/// on an async executor thread).
fn try_query(url: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || -> Result<Vec<Vec<Option<String>>>, String> {
        let mut client = url
            .parse::<postgres::Config>()
            .map_err(|e| e.to_string())?
            .connect(postgres::NoTls)
            .map_err(|e| e.to_string())?;
        let messages = client
            .simple_query(&sql)
            .map_err(|e| match e.as_db_error() {
                Some(db) => db.message().to_owned(),
                None => e.to_string(),
            })?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect())
    })
    .join()
    .map_err(|_| "query thread panicked".to_owned())?
}
