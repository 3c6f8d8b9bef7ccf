//! Files on disk: written whole or not at all, and what runs after a write.
//!
//! A reader (a training job, the AWS SDK, nginx) may open the file at any instant: it must
//! see the old credential or the new one, never a torn or empty file. So every write goes
//! to a new temporary file in the same directory (created with its final mode, never
//! readable by others in between), is flushed to disk, and is renamed over the old one;
//! the directory is flushed too, so the rename survives a crash.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A file operation that failed, with the path.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError {
        path: path.to_path_buf(),
        source,
    }
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary name beside `path`, unique to this process and call.
fn temp_beside(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    dir_of(path).join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Replaces `path` with `bytes` atomically, with file mode `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = temp_beside(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(at(&tmp))?;
        // The umask may have narrowed the mode; a credential's mode is what was asked.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(at(&tmp))?;
        f.write_all(bytes).map_err(at(&tmp))?;
        f.sync_all().map_err(at(&tmp))?;
        fs::rename(&tmp, path).map_err(at(path))?;
        File::open(dir_of(path))
            .and_then(|d| d.sync_all())
            .map_err(at(dir_of(path)))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes `path`; a file already gone is not an error.
pub fn remove(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(at(path)(e)),
        _ => Ok(()),
    }
}

/// Checks before anything is asked for that a credential can be written to `path`: its
/// directory exists and takes a new file. Leaves nothing behind.
pub fn check_writable(path: &Path) -> Result<(), FileError> {
    let tmp = temp_beside(path);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(at(&tmp))?;
    fs::remove_file(&tmp).map_err(at(&tmp))
}

/// How long a post-write command may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `argv` (no shell) and waits for it, at most [`COMMAND_TIMEOUT`].
pub async fn run_command(argv: &[String]) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    match tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("{program} exited with {s}")),
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        Err(_) => Err(format!(
            "{program} ran longer than {COMMAND_TIMEOUT:?}; killed"
        )),
    }
}

/// Sends `signal` (one of [`super::config::SIGNALS`]) to the process whose id is in
/// `pid_file`.
pub fn send_signal(pid_file: &Path, signal: &str) -> Result<(), String> {
    use rustix::process::{kill_process, Pid, Signal};
    let text = fs::read_to_string(pid_file).map_err(|e| format!("{}: {e}", pid_file.display()))?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| format!("{}: not a process id", pid_file.display()))?;
    let sig = match signal {
        "HUP" => Signal::HUP,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "INT" => Signal::INT,
        "TERM" => Signal::TERM,
        other => return Err(format!("unknown signal {other}")),
    };
    kill_process(pid, sig).map_err(|e| format!("signal {signal} to {pid:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_with_its_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        write_atomic(&path, b"one", 0o600).expect("first write");
        write_atomic(&path, b"two", 0o640).expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("token")]);
    }

    #[test]
    fn a_write_into_a_missing_directory_fails_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope").join("token");
        let err = write_atomic(&path, b"x", 0o600).expect_err("no directory");
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(check_writable(&path).is_err());
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }
}
