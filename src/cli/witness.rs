//! `witness` and `monitor`: the audit log's outside observers. A witness (another team
//! runs one) cosigns checkpoints that extend what it saw; a monitor follows the log and
//! reports what concerns the identities it watches.

use std::sync::Arc;

use serde_json::json;

use spiffe_broker::checkpoint::VerifierKey;
use spiffe_broker::clock::SystemClock;
use spiffe_broker::cosignature::{Cosigner, CosignerKey, WitnessPolicy};
use spiffe_broker::monitor::{Monitor, MonitorError, MonitorOptions, Watch};
use spiffe_broker::witness::service::Witness;

use super::args::{MonitorArgs, WitnessArgs, WitnessPolicyArgs};
use super::audit::key_text;
use super::error::CliError;
use super::output::*;
use super::serve::shutdown_signal;

pub async fn witness(a: WitnessArgs) -> Result<(), CliError> {
    let cosigner =
        Cosigner::load_or_create(&a.key, &a.name).map_err(|e| format!("witness key: {e}"))?;
    let logs = a
        .log_keys
        .iter()
        .map(|k| {
            VerifierKey::parse(&key_text(k)?)
                .map_err(|e| CliError::from(format!("--log-key {k}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let witness =
        Arc::new(Witness::open(cosigner, logs, &a.state, Arc::new(SystemClock)).map_err(fail)?);
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
    let addr = listener.local_addr().map_err(fail)?;
    out!(
        "{}",
        json!({"listening": addr.to_string(), "vkey": witness.vkey()})
    );
    tracing::info!(%addr, name = %a.name, "witness ready");
    axum::serve(listener, witness.router())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("witness: {e}").into())
}

/// The witness policy of `audit verify`'s and `monitor`'s flags (`None` without --witness).
pub fn witness_policy(a: &WitnessPolicyArgs) -> Result<Option<WitnessPolicy>, CliError> {
    if a.keys.is_empty() {
        return Ok(None);
    }
    let keys = a
        .keys
        .iter()
        .map(|k| {
            CosignerKey::parse(&key_text(k)?)
                .map_err(|e| CliError::from(format!("--witness {k}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    WitnessPolicy::new(keys, a.witness_quorum, a.min_size)
        .map(Some)
        .map_err(|e| e.0.into())
}

pub async fn monitor(a: MonitorArgs) -> Result<(), CliError> {
    use spiffe_broker::http_client::{HttpClient, Options, Trust};
    let watches = a
        .watches
        .iter()
        .map(|w| Watch::parse(w))
        .collect::<Result<Vec<_>, _>>()?;
    let log_key =
        VerifierKey::parse(&key_text(&a.log_key)?).map_err(|e| format!("--log-key: {e}"))?;
    let client =
        HttpClient::new(&Options::new(Trust::from_ca_file(a.ca_file.as_deref()))).map_err(fail)?;
    let mut monitor = Monitor::open(
        MonitorOptions {
            log_url: a.log_url.clone(),
            log_key,
            witnesses: witness_policy(&a.witnesses)?,
            watches,
            state: a.state.clone(),
        },
        client.clone(),
    )
    .map_err(fail)?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let batch = match monitor.poll().await {
            Ok(batch) => batch,
            // Following: a log that is down or has no checkpoint yet is waited for.
            Err(e @ MonitorError::Unreachable(_)) if !a.once => {
                tracing::warn!(error = %e, "log not reachable; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(a.interval) => continue,
                    _ = &mut stop => return Ok(()),
                }
            }
            Err(e) => return Err(format!("monitor: {e}").into()),
        };
        for r in &batch.reports {
            out!("{}", serde_json::to_string(r).map_err(fail)?);
        }
        if let (Some(url), false) = (&a.webhook, batch.reports.is_empty()) {
            let body = serde_json::to_vec(&json!({"reports": batch.reports})).map_err(fail)?;
            let req = http::Request::post(url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .map_err(fail)?;
            let resp = client
                .send(req)
                .await
                .map_err(|e| format!("webhook: {e}"))?;
            if !resp.status.is_success() {
                return Err(format!("webhook: HTTP {}", resp.status).into());
            }
        }
        monitor.commit(batch).map_err(fail)?;
        if a.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(a.interval) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}
