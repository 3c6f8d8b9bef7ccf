//! `audit verify | export | proof`: the verifiable log, offline or from a broker.

use std::sync::Arc;

use serde_json::json;

use spiffe_broker::checkpoint::VerifierKey;
use spiffe_broker::cosignature::WitnessPolicy;
use spiffe_broker::proto::v1 as pb;

use super::args::*;
use super::error::CliError;
use super::output::*;
use super::witness::witness_policy;

/// A verifier key given on the command line: a file holding it, or the key itself.
pub fn key_text(arg: &str) -> Result<String, CliError> {
    if std::path::Path::new(arg).exists() {
        std::fs::read_to_string(arg).map_err(|e| format!("{arg}: {e}").into())
    } else {
        Ok(arg.to_owned())
    }
}

/// The log key's text: `arg` (a file, or the key itself), else the `default` file.
fn vkey_text(arg: &Option<String>, default: &std::path::Path) -> Result<Option<String>, CliError> {
    Ok(match arg {
        Some(a) => Some(key_text(a)?),
        None if default.exists() => Some(std::fs::read_to_string(default).map_err(fail)?),
        None => None,
    })
}

pub fn load_vkey(
    arg: &Option<String>,
    default: &std::path::Path,
) -> Result<Option<VerifierKey>, CliError> {
    vkey_text(arg, default)?
        .map(|text| VerifierKey::parse(&text).map_err(|e| format!("log key: {e}").into()))
        .transpose()
}

/// How a CLI command opens a ledger: it reads; a long busy wait rather than a failure
/// beside a running broker.
fn reader_config() -> spiffe_broker::config::LedgerConfig {
    spiffe_broker::config::LedgerConfig {
        commit_timeout: std::time::Duration::from_secs(30),
        busy_timeout: std::time::Duration::from_secs(5),
        max_batch: 1,
        postgres_sslmode: None,
        postgres_ca_file: None,
    }
}

/// The PostgreSQL ledger at `url`, opened like a replica (it writes nothing but its
/// own migrations check). Errors name the server, never the password.
async fn open_postgres(url: String) -> Result<Arc<dyn spiffe_broker::store::Store>, CliError> {
    let store = tokio::task::spawn_blocking(move || {
        spiffe_broker::store::PostgresStore::open(
            &url,
            &reader_config(),
            Arc::new(spiffe_broker::metrics::Metrics::new()),
        )
    })
    .await
    .map_err(fail)?
    .map_err(fail)?;
    Ok(Arc::new(store))
}

/// The ledger of a state dir (SQLite), or the PostgreSQL one at `postgres_url`, through
/// the `Store` seam.
pub(super) async fn open_ledger(
    state_dir: &std::path::Path,
    postgres_url: Option<String>,
) -> Result<Arc<dyn spiffe_broker::store::Store>, CliError> {
    if let Some(url) = postgres_url {
        return open_postgres(url).await;
    }
    let path = state_dir.join("ledger.db");
    if !path.exists() {
        return Err(format!("no ledger at {}", path.display()).into());
    }
    Ok(Arc::new(
        spiffe_broker::store::SqliteStore::open(
            &path,
            &reader_config(),
            Arc::new(spiffe_broker::metrics::Metrics::new()),
        )
        .map_err(fail)?,
    ))
}

/// Checks a verified log's checkpoints against the witness policy: what was witnessed,
/// or the error naming the first checkpoint whose cosignature fails.
fn witnessed(
    policy: &Option<WitnessPolicy>,
    notes: &[String],
) -> Result<serde_json::Value, CliError> {
    let Some(policy) = policy else {
        return Ok(serde_json::Value::Null);
    };
    let w = policy
        .check_log(notes.iter().map(String::as_str))
        .map_err(|e| format!("witness policy: {e}"))?;
    Ok(json!({"size": w.checkpoint.size, "cosigners": w.cosigners}))
}

pub async fn audit_command(command: AuditCommand) -> Result<(), CliError> {
    match command {
        AuditCommand::Verify {
            export: Some(dir),
            log_key,
            witnesses,
            ..
        } => {
            let policy = witness_policy(&witnesses)?;
            let vkey = load_vkey(&log_key, &dir.join("log.vkey"))?;
            let r =
                spiffe_broker::store::export::verify_export(&dir, vkey.as_ref()).map_err(fail)?;
            let witnessed = witnessed(&policy, &r.notes)?;
            out!(
                "{}",
                json!({"ok": true, "export": dir, "entries": r.entries, "head_hash": r.head_hash, "root": r.root, "checkpoints_verified": r.checkpoints, "latest_checkpoint": r.latest_checkpoint, "witnessed": witnessed})
            );
            Ok(())
        }
        AuditCommand::Verify {
            postgres_url: Some(url),
            state_dir,
            log_key,
            witnesses,
            ..
        } => {
            let policy = witness_policy(&witnesses)?;
            let vkey = load_vkey(&log_key, &state_dir.join("keys").join("log.vkey"))?
                .ok_or("no log key: pass --log-key (the broker writes STATE_DIR/keys/log.vkey)")?;
            let server = spiffe_broker::config::postgres::redact(&url);
            let store = open_postgres(url).await?;
            let r = spiffe_broker::store::verify_store(store.as_ref(), &vkey)
                .await
                .map_err(fail)?;
            let witnessed = witnessed(&policy, &r.notes)?;
            out!(
                "{}",
                json!({"ok": true, "ledger": server, "entries": r.entries, "head_hash": r.head_hash, "root": r.root, "checkpoints_verified": r.checkpoints, "latest_checkpoint": r.latest_checkpoint, "witnessed": witnessed})
            );
            Ok(())
        }
        AuditCommand::Verify {
            state_dir,
            log_key,
            witnesses,
            ..
        } => {
            let policy = witness_policy(&witnesses)?;
            let path = state_dir.join("ledger.db");
            if !path.exists() {
                return Err(format!("no ledger at {}", path.display()).into());
            }
            let vkey = load_vkey(&log_key, &state_dir.join("keys").join("log.vkey"))?
                .ok_or("no log key: pass --log-key (the broker writes STATE_DIR/keys/log.vkey)")?;
            let v = spiffe_broker::store::sqlite::SqliteStore::verify_file_with(&path, &vkey)
                .map_err(fail)?;
            let witnessed = witnessed(&policy, &v.report.notes)?;
            out!(
                "{}",
                json!({"ok": true, "ledger": v.path, "entries": v.entries, "head_hash": v.head_hash, "root": v.report.root, "checkpoints_verified": v.report.checkpoints, "latest_checkpoint": v.report.latest_checkpoint, "witnessed": witnessed})
            );
            Ok(())
        }
        AuditCommand::Export {
            state_dir,
            postgres_url,
            log_key,
            out,
        } => {
            let vkey = vkey_text(&log_key, &state_dir.join("keys").join("log.vkey"))?
                .ok_or("no log key: pass --log-key (the broker writes STATE_DIR/keys/log.vkey)")?;
            VerifierKey::parse(&vkey).map_err(|e| format!("log key: {e}"))?;
            let store = open_ledger(&state_dir, postgres_url).await?;
            let s = spiffe_broker::store::export::export(store.as_ref(), &vkey, &out)
                .await
                .map_err(fail)?;
            out!(
                "{}",
                json!({"ok": true, "out": s.dir, "entries": s.entries, "checkpoints": s.checkpoints})
            );
            Ok(())
        }
        AuditCommand::Proof {
            lease,
            sequence,
            conn,
        } => {
            use pb::get_inclusion_proof_request::Entry;
            let entry = match (lease, sequence) {
                (Some(l), _) => Entry::LeaseId(l),
                (None, Some(n)) => Entry::Sequence(n),
                (None, None) => return Err("one of --lease or --sequence is required".into()),
            };
            let ch = channel(&conn).await?;
            let mut admin = pb::admin_client::AdminClient::new(ch);
            let p = admin
                .get_inclusion_proof(pb::GetInclusionProofRequest {
                    entry: Some(entry),
                    tree_size: 0,
                })
                .await?
                .into_inner();
            // Verify locally: the note's signature with the log key, then the path.
            let key = http_log_key(&conn).await;
            let cp_ok = key.as_ref().map(|k| {
                k.verify(&p.checkpoint)
                    .map(|c| c.size == p.tree_size && hex::encode(c.root) == p.root_hash)
            });
            let hash = |h: &str| -> Result<[u8; 32], CliError> {
                hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| CliError::from("bad hash in proof"))
            };
            let path = p
                .proof
                .iter()
                .map(|h| hash(h))
                .collect::<Result<Vec<_>, _>>()?;
            let leaf = spiffe_broker::merkle::leaf_hash(p.entry.as_bytes());
            let included = hex::encode(leaf) == p.leaf_hash
                && spiffe_broker::merkle::verify_inclusion(
                    &leaf,
                    p.leaf_index,
                    p.tree_size,
                    &path,
                    &hash(&p.root_hash)?,
                )
                .is_ok();
            out!(
                "{}",
                json!({
                    "included": included,
                    "checkpoint_signature_ok": cp_ok.as_ref().map(|r| matches!(r, Ok(true))),
                    "sequence": p.sequence,
                    "leaf_index": p.leaf_index,
                    "tree_size": p.tree_size,
                    "root_hash": p.root_hash,
                    "entry": serde_json::from_str::<serde_json::Value>(&p.entry).unwrap_or_default(),
                    "proof": p.proof,
                    "checkpoint": p.checkpoint,
                })
            );
            if included {
                Ok(())
            } else {
                Err("the inclusion proof does not verify".into())
            }
        }
    }
}

/// The log key from the broker's GetCheckpoint (an auditor should pin it instead).
pub async fn http_log_key(conn: &ConnArgs) -> Option<VerifierKey> {
    let ch = channel(conn).await.ok()?;
    let cp = pb::admin_client::AdminClient::new(ch)
        .get_checkpoint(pb::GetCheckpointRequest::default())
        .await
        .ok()?
        .into_inner();
    VerifierKey::parse(&cp.log_key).ok()
}
