//! `witness`: a transparency-log witness another team can run beside the broker.

use std::sync::Arc;

use serde_json::json;

use spiffe_broker::checkpoint::VerifierKey;
use spiffe_broker::clock::SystemClock;
use spiffe_broker::cosignature::Cosigner;
use spiffe_broker::witness::service::Witness;

use super::args::WitnessArgs;
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
