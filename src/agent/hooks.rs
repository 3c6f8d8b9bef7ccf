//! What runs after a credential is written: a command, or a signal to a process.

use std::fs;
use std::path::Path;
use std::time::Duration;

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
