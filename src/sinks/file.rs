//! The `file` sink: one JSON object per line, in `audit export`'s entry format (`seq`,
//! `kind`, `lease_id`, `body`, `prev_hash`, `hash`, `leaf_hash`), so a SIEM tails it and
//! an auditor can check the chain. Rotated before a file would pass `max_size_mb` or span
//! more than `max_age` of entries: `PATH` → `PATH.1` → … → `PATH.keep`, the oldest
//! dropped. Written with `O_APPEND` and fsync'd per delivery; on start the last line of
//! `PATH` says where the file stands, so an entry written just before a crash (whose
//! position was not stored yet) is not written again.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{Facts, Sink, SinkError};
use crate::audit::StoredEntry;
use crate::config::{AuditSinkConfig, SinkKind};
use crate::store::export::ExportEntry;

/// The file sink.
pub(super) struct FileSink {
    /// The file's state; out while a delivery runs on a blocking thread.
    state: Option<State>,
}

struct State {
    path: PathBuf,
    max_bytes: u64,
    max_age: Option<Duration>,
    keep: u32,
    /// The open file, its size, its first entry's time and its last entry (read on open).
    open: Option<Open>,
}

struct Open {
    file: File,
    size: u64,
    first_ms: Option<i64>,
    last_seq: u64,
}

impl FileSink {
    pub(super) fn new(config: &AuditSinkConfig) -> Self {
        let SinkKind::File {
            path,
            max_bytes,
            max_age,
            keep,
        } = &config.kind
        else {
            unreachable!("a file sink's config")
        };
        Self {
            state: Some(State {
                path: path.clone(),
                max_bytes: *max_bytes,
                max_age: *max_age,
                keep: *keep,
                open: None,
            }),
        }
    }
}

impl Sink for FileSink {
    fn deliver<'a>(
        &'a mut self,
        entries: &'a [StoredEntry],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut state = self
                .state
                .take()
                .ok_or_else(|| SinkError("a previous delivery was abandoned".into()))?;
            let entries = entries.to_vec();
            let (state, result) = tokio::task::spawn_blocking(move || {
                let r = state.write(&entries);
                (state, r)
            })
            .await
            .map_err(|e| SinkError(format!("file sink: {e}")))?;
            self.state = Some(state);
            result
        })
    }
}

impl State {
    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// Writes the entries the file does not have yet. On a failure the file is closed:
    /// the next try reopens it and reads where it really ends.
    fn write(&mut self, entries: &[StoredEntry]) -> Result<(), SinkError> {
        let shown = self.shown();
        let at = |e: std::io::Error| SinkError(format!("{shown}: {e}"));
        let mut file = match self.open.take() {
            Some(f) => f,
            None => open(&self.path).map_err(at)?,
        };
        let mut out = Vec::new();
        let mut out_first_ms = None;
        for e in entries {
            if e.seq <= file.last_seq {
                continue; // written before a restart, position not stored yet
            }
            let line = serde_json::to_string(&ExportEntry::from(e))
                .map_err(|e| SinkError(e.to_string()))?;
            let time_ms = Facts::of(e, 0).time_ms;
            let first_ms = file.first_ms.or(out_first_ms).unwrap_or(time_ms);
            let too_big = file.size + out.len() as u64 + line.len() as u64 + 1 > self.max_bytes;
            let too_old = self
                .max_age
                .is_some_and(|age| time_ms.saturating_sub(first_ms) >= age.as_millis() as i64);
            if (too_big || too_old) && file.size + out.len() as u64 > 0 {
                append(&mut file, &out).map_err(at)?;
                out.clear();
                out_first_ms = None;
                let last_seq = file.last_seq;
                drop(file);
                file = self.rotate().map_err(at)?;
                file.last_seq = last_seq;
            }
            out_first_ms.get_or_insert(time_ms);
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
            file.last_seq = e.seq;
        }
        append(&mut file, &out).map_err(at)?;
        file.first_ms = file.first_ms.or(out_first_ms);
        self.open = Some(file);
        Ok(())
    }

    /// `PATH.k` → `PATH.k+1` (the last dropped), `PATH` → `PATH.1`, a fresh `PATH`.
    fn rotate(&self) -> std::io::Result<Open> {
        let numbered = |k: u32| PathBuf::from(format!("{}.{k}", self.path.display()));
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for k in (1..self.keep).rev() {
                match std::fs::rename(numbered(k), numbered(k + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        if let Some(dir) = self.path.parent() {
            File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })?
            .sync_all()?;
        }
        open(&self.path)
    }
}

/// Appends `bytes` and makes them durable.
fn append(file: &mut Open, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    file.file.write_all(bytes)?;
    file.file.sync_data()?;
    file.size += bytes.len() as u64;
    Ok(())
}

/// Opens (creates, mode 0600) `path` for appending and reads where it stands: its size,
/// its first entry's time and its last entry's sequence. A torn last line (a crash
/// mid-write) is cut off first.
fn open(path: &Path) -> std::io::Result<Open> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let mut size = file.metadata()?.len();
    let mut last_seq = 0;
    let mut first_ms = None;
    if size > 0 {
        let tail = read_tail(&mut file, size)?;
        let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < tail.len() {
            // Torn: drop the partial line.
            size -= (tail.len() - complete) as u64;
            file.set_len(size)?;
        }
        last_seq = String::from_utf8_lossy(&tail[..complete])
            .lines()
            .next_back()
            .and_then(|l| serde_json::from_str::<ExportEntry>(l).ok())
            .map_or(0, |e| e.seq);
        file.seek(SeekFrom::Start(0))?;
        let mut first = String::new();
        BufReader::new(&file).read_line(&mut first)?;
        first_ms = serde_json::from_str::<ExportEntry>(&first)
            .ok()
            .and_then(|e| serde_json::from_str::<Facts>(&e.body).ok())
            .map(|f| f.time_ms);
    }
    Ok(Open {
        file,
        size,
        first_ms,
        last_seq,
    })
}

/// The last 1 MiB of the file (an entry line is far shorter): its bytes up to the end.
fn read_tail(file: &mut File, size: u64) -> std::io::Result<Vec<u8>> {
    let from = size.saturating_sub(1 << 20);
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.take(size - from).read_to_end(&mut buf)?;
    Ok(buf)
}
