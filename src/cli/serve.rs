//! `serve` and `dev`: running the broker.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use spiffe_broker::clock::{rfc3339, SystemClock};
use spiffe_broker::config::Config;
use spiffe_broker::{dev, server};

use super::args::*;
use super::error::CliError;
use super::output::*;

/// SIGHUP reloads the policy; a bad policy is refused and the old one stays in force.
pub fn reload_on_sighup(broker: Arc<spiffe_broker::broker::Broker>) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match broker.reload_policy(None, None).await {
                Ok(hash) => tracing::info!(policy_hash = %hash, "SIGHUP: policy reloaded"),
                Err(e) => tracing::warn!(error = %e, "SIGHUP: policy reload refused"),
            }
        }
    });
}

pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down: draining in-flight requests");
}

/// What `dev`'s flags change in the demo config: the checkpoint interval, the witnesses
/// (`--witness URL,VKEY`), the webhooks, and whatever `--config-append FILE` adds.
fn dev_config_edit(args: &DevArgs) -> Result<dev::ConfigEdit, CliError> {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut tables = String::new();
    for w in &args.witnesses {
        let (url, vkey) = w
            .split_once(',')
            .ok_or_else(|| format!("--witness {w:?}: expected URL,VKEY"))?;
        tables.push_str(&format!(
            "\n[[witnesses]]\nurl = {}\nvkey = {}\n",
            quote(url),
            quote(vkey.trim())
        ));
    }
    if let Some(url) = &args.approval_webhook {
        let secret = webhook_secret(&args.state_dir)?;
        tables.push_str(&format!(
            "\n[[audit_sinks]]\nname = \"approval-webhook\"\ntype = \"webhook\"\nurl = {}\nsecret_file = {}\nbatch = 100\nretry_max = \"5s\"\n",
            quote(url),
            quote(&secret.display().to_string())
        ));
    }
    if let Some(url) = &args.slack_webhook {
        tables.push_str(&format!(
            "\n[[audit_sinks]]\nname = \"slack\"\ntype = \"webhook\"\nformat = \"slack\"\nurl = {}\nbatch = 100\nretry_max = \"5s\"\n",
            quote(url)
        ));
    }
    if let Some(path) = &args.config_append {
        let extra = std::fs::read_to_string(path)
            .map_err(|e| format!("--config-append {}: {e}", path.display()))?;
        tables.push('\n');
        tables.push_str(&extra);
    }
    let top = format!(
        "checkpoint_interval = {}\n",
        quote(&spiffe_broker::clock::format_duration(
            args.checkpoint_interval
        ))
    );
    Ok(Box::new(move |demo: String| format!("{top}{demo}{tables}")))
}

/// The dev approval webhook's secret (`STATE_DIR/webhook.secret`, `whsec_…`, 0600),
/// generated once.
fn webhook_secret(state_dir: &std::path::Path) -> Result<PathBuf, CliError> {
    use base64::Engine as _;
    let path = std::fs::canonicalize(state_dir)
        .or_else(|_| {
            std::fs::create_dir_all(state_dir)?;
            std::fs::canonicalize(state_dir)
        })
        .map_err(|e| format!("{}: {e}", state_dir.display()))?
        .join("webhook.secret");
    if !path.exists() {
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key[..])
            .map_err(|_| "webhook secret: no randomness")?;
        let line = zeroize::Zeroizing::new(format!(
            "whsec_{}\n",
            base64::engine::general_purpose::STANDARD.encode(&key[..])
        ));
        spiffe_broker::files::write_private(&path, line.as_bytes()).map_err(fail)?;
    }
    Ok(path)
}

pub async fn serve(path: PathBuf) -> Result<(), CliError> {
    let config = Config::load(&path).map_err(fail)?;
    let parts = server::assemble(&config, Some(&path), Arc::new(SystemClock))
        .await
        .map_err(fail)?;
    reload_on_sighup(parts.broker.clone());
    let grpc = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.grpc_addr))?;
    let http = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.http_addr))?;
    tracing::info!(grpc = %config.grpc_addr, http = %config.http_addr, spiffe_id = %parts.spiffe_id, "ready");
    server::run(parts, grpc, http, shutdown_signal())
        .await
        .map_err(fail)
}

pub async fn dev(args: DevArgs) -> Result<(), CliError> {
    match args.command {
        Some(DevCommand::MintSvid {
            spiffe_id,
            out,
            state_dir,
            ttl,
        }) => {
            let id = spiffe::SpiffeId::new(&spiffe_id).map_err(|e| format!("{spiffe_id}: {e}"))?;
            let ca =
                spiffe_broker::workload::DevCa::load_or_create(&state_dir, id.trust_domain_name())
                    .map_err(fail)?;
            let svid = ca.mint_x509_svid(&id, ttl).map_err(fail)?;
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            std::fs::write(out.join("svid.pem"), &svid.cert_pem).map_err(fail)?;
            spiffe_broker::files::write_private(&out.join("svid.key"), svid.key_pem.as_bytes())
                .map_err(fail)?;
            std::fs::write(out.join("bundle.pem"), ca.ca_pem()).map_err(fail)?;
            out!(
                "{}",
                json!({"spiffe_id": id.to_string(), "out": out, "expires_at": rfc3339(spiffe_broker::clock::unix_seconds(svid.not_after))})
            );
            Ok(())
        }
        None => {
            let parse =
                |s: &str, f: &str| s.parse().map_err(|_| format!("{f}: {s:?} is not IP:port"));
            let opts = dev::DevOptions {
                state_dir: args.state_dir.clone(),
                grpc_addr: parse(&args.grpc_addr, "--grpc-addr")?,
                http_addr: parse(&args.http_addr, "--http-addr")?,
                svid_ttl: args.svid_ttl,
                clock: Arc::new(SystemClock),
                config: Some(dev_config_edit(&args)?),
                vault_addr: Some(args.vault_addr.clone()),
                aws_sts_endpoint: Some(args.aws_sts_endpoint.clone()),
            };
            let env = dev::start(opts).await.map_err(fail)?;
            reload_on_sighup(env.broker.clone());
            let dir = std::fs::canonicalize(&env.state_dir).unwrap_or(env.state_dir.clone());
            out!("spiffe-broker dev");
            out!("  state dir:     {}", dir.display());
            out!(
                "  gRPC (mTLS):   {}   broker id {}",
                env.grpc_addr,
                dev::BROKER_ID
            );
            out!(
                "  HTTP:          http://{}   (discovery: /.well-known/openid-configuration)",
                env.http_addr
            );
            out!("  trust bundle:  {}", dir.join("bundle.pem").display());
            out!("  workloads:");
            for id in dev::DEMO_IDS {
                out!(
                    "    {id:<42} unix://{}",
                    dir.join("workloads")
                        .join(spiffe_broker::workload::socket_name(
                            &spiffe::SpiffeId::new(id).map_err(fail)?
                        ))
                        .display()
                );
            }
            out!(
                "  try: SPIFFE_ENDPOINT_SOCKET=unix://{}/workloads/deploy-agent.sock spiffe-broker request --profile gpu-scheduler-submit --scope job:submit --ttl 10m --intent-action submit-training --intent-target queue/a100",
                dir.display()
            );
            out!("ready");
            shutdown_signal().await;
            env.shutdown().await.map_err(fail)
        }
    }
}
