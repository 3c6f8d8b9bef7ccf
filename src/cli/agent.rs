//! `agent`: keeps credentials fresh on disk until SIGTERM or SIGINT, then gives them back.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use spiffe_broker::agent::{Agent, AgentConfig};
use spiffe_broker::clock::SystemClock;

use super::error::CliError;
use super::output::fail;
use super::serve::shutdown_signal;

pub async fn agent(path: PathBuf, check: bool) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = AgentConfig::from_toml(&text).map_err(fail)?;
    if check {
        config.check_paths().map_err(fail)?;
        let names: Vec<_> = config.credentials.iter().map(|c| c.name()).collect();
        out!(
            "{}",
            json!({"ok": true, "config": path, "credentials": names})
        );
        return Ok(());
    }
    let agent = Agent::start(config, Arc::new(SystemClock))
        .await
        .map_err(fail)?;
    tracing::info!(
        credentials = agent.status().len(),
        health = ?agent.health_addr(),
        "ready"
    );
    shutdown_signal().await;
    tracing::info!("stopping: releasing leases and removing files");
    agent.shutdown().await;
    Ok(())
}
