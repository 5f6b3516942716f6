//! The SQLite registry: runs, their metric points and event history, saved argument sets and
//! user settings. Migrations in `migrations/` run at start.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use protocol::run::{ArgSet, MetricPoint, Run, RunEvent, RunEventMsg, RunKind, RunStatus};
use serde_json::{Map, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Clone)]
pub struct Db {
    pool: SqlitePool,
}

pub struct NewRun<'a> {
    pub kind: RunKind,
    pub config: &'a Map<String, Value>,
    pub output_dir: &'a str,
    pub model: &'a str,
    pub dataset: &'a str,
}

fn json_map(text: &str) -> Map<String, Value> {
    serde_json::from_str(text).unwrap_or_default()
}

const RUN_COLUMNS: &str = "id, kind, status, config, output_dir, model, dataset, created_at, \
    started_at, finished_at, exit_code, error, step, total_steps, final_loss, result";

/// A run's row; a kind or status this server does not know (a newer server's database) is an
/// error, never a guess.
fn run_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Run> {
    let id: i64 = r.get("id");
    let kind: &str = r.get("kind");
    let kind = RunKind::parse(kind)
        .with_context(|| format!("run {id} in the database has an unknown kind `{kind}`"))?;
    let status: &str = r.get("status");
    let status = RunStatus::parse(status)
        .with_context(|| format!("run {id} in the database has an unknown status `{status}`"))?;
    Ok(Run {
        id,
        kind,
        status,
        config: json_map(r.get("config")),
        output_dir: r.get("output_dir"),
        model: r.get("model"),
        dataset: r.get("dataset"),
        created_at: r.get("created_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        exit_code: r.get("exit_code"),
        error: r.get("error"),
        step: r.get::<i64, _>("step") as u64,
        total_steps: r.get::<i64, _>("total_steps") as u64,
        final_loss: r.get("final_loss"),
        queue_position: None,
        result: json_map(r.get("result")),
    })
}

/// Filters of the run list.
#[derive(Default, serde::Deserialize)]
pub struct RunFilter {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub model: Option<String>,
    pub limit: Option<i64>,
}

impl Db {
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        sqlx::migrate!("../migrations")
            .run(&pool)
            .await
            .with_context(|| format!("cannot migrate the database {}", path.display()))?;
        Ok(Self { pool })
    }

    pub async fn insert_run(&self, r: NewRun<'_>, log_path: &str) -> Result<i64> {
        let id = sqlx::query(
            "INSERT INTO runs (kind, status, config, output_dir, model, dataset, created_at, log_path) \
             VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
        )
        .bind(r.kind.as_str())
        .bind(serde_json::to_string(r.config)?)
        .bind(r.output_dir)
        .bind(r.model)
        .bind(r.dataset)
        .bind(now())
        .bind(log_path)
        .execute(&self.pool)
        .await?
        .last_insert_rowid();
        Ok(id)
    }

    pub async fn set_log_path(&self, id: i64, log_path: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET log_path = ? WHERE id = ?")
            .bind(log_path)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn run(&self, id: i64) -> Result<Option<Run>> {
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    pub async fn log_path(&self, id: i64) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT log_path FROM runs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn runs(&self, f: &RunFilter) -> Result<Vec<Run>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR status = ?1) \
             AND (?2 IS NULL OR kind = ?2) AND (?3 IS NULL OR model = ?3) ORDER BY id DESC LIMIT ?4"
        ))
        .bind(&f.status)
        .bind(&f.kind)
        .bind(&f.model)
        .bind(f.limit.unwrap_or(200).clamp(1, 1000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub async fn runs_with_status(&self, statuses: &[RunStatus]) -> Result<Vec<Run>> {
        let mut out = Vec::new();
        for s in statuses {
            let rows = sqlx::query(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE status = ? ORDER BY id"
            ))
            .bind(s.as_str())
            .fetch_all(&self.pool)
            .await?;
            for row in &rows {
                out.push(run_from_row(row)?);
            }
        }
        Ok(out)
    }

    pub async fn delete_run(&self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM runs WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_status(
        &self,
        id: i64,
        status: RunStatus,
        exit_code: Option<i64>,
        error: Option<&str>,
    ) -> Result<()> {
        let t = now();
        sqlx::query(
            "UPDATE runs SET status = ?1, exit_code = COALESCE(?2, exit_code), error = ?3, \
             started_at = CASE WHEN ?1 = 'running' THEN ?4 ELSE started_at END, \
             finished_at = CASE WHEN ?1 IN ('queued', 'running') THEN NULL ELSE ?4 END WHERE id = ?5",
        )
        .bind(status.as_str())
        .bind(exit_code)
        .bind(error)
        .bind(t)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves run `id` to `to` only if its status is one of `from`, in one statement; false when
    /// it was not (another request moved it first).
    pub async fn transition(&self, id: i64, from: &[RunStatus], to: RunStatus) -> Result<bool> {
        let placeholders: Vec<String> = (0..from.len()).map(|i| format!("?{}", i + 3)).collect();
        let sql = format!(
            "UPDATE runs SET status = ?1, error = NULL, \
             finished_at = CASE WHEN ?1 IN ('queued', 'running') THEN NULL ELSE finished_at END \
             WHERE id = ?2 AND status IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(to.as_str()).bind(id);
        for s in from {
            q = q.bind(s.as_str());
        }
        Ok(q.execute(&self.pool).await?.rows_affected() == 1)
    }

    pub async fn set_progress(&self, id: i64, step: u64, total: u64) -> Result<()> {
        sqlx::query("UPDATE runs SET step = ?, total_steps = MAX(total_steps, ?) WHERE id = ?")
            .bind(step as i64)
            .bind(total as i64)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_result(&self, id: i64, result: &Map<String, Value>) -> Result<()> {
        let loss = result.get("train_loss").and_then(Value::as_f64);
        sqlx::query(
            "UPDATE runs SET result = ?, final_loss = COALESCE(?, final_loss) WHERE id = ?",
        )
        .bind(serde_json::to_string(result)?)
        .bind(loss)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Merges a point into the run's curve: values of the same step from train and eval events
    /// end up in one row; a resumed run overwrites the steps it repeats.
    pub async fn upsert_metric(&self, id: i64, p: &MetricPoint) -> Result<()> {
        sqlx::query(
            "INSERT INTO metrics (run_id, step, loss, eval_loss, lr, epoch, grad_norm, tokens_per_sec, \
             elapsed_s, eta_s, total, extra) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT (run_id, step) DO UPDATE SET loss = COALESCE(?3, loss), \
             eval_loss = COALESCE(?4, eval_loss), lr = COALESCE(?5, lr), epoch = COALESCE(?6, epoch), \
             grad_norm = COALESCE(?7, grad_norm), tokens_per_sec = COALESCE(?8, tokens_per_sec), \
             elapsed_s = COALESCE(?9, elapsed_s), eta_s = COALESCE(?10, eta_s), \
             total = COALESCE(?11, total), extra = json_patch(extra, ?12)",
        )
        .bind(id)
        .bind(p.step as i64)
        .bind(p.loss)
        .bind(p.eval_loss)
        .bind(p.lr)
        .bind(p.epoch)
        .bind(p.grad_norm)
        .bind(p.tokens_per_sec)
        .bind(p.elapsed_s)
        .bind(p.eta_s)
        .bind(p.total.map(|t| t as i64))
        .bind(serde_json::to_string(&p.extra)?)
        .execute(&self.pool)
        .await?;
        if let Some(loss) = p.loss {
            sqlx::query("UPDATE runs SET final_loss = ? WHERE id = ?")
                .bind(loss)
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    pub async fn metrics(&self, id: i64) -> Result<Vec<MetricPoint>> {
        let rows = sqlx::query(
            "SELECT step, loss, eval_loss, lr, epoch, grad_norm, tokens_per_sec, elapsed_s, eta_s, \
             total, extra FROM metrics WHERE run_id = ? ORDER BY step",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| MetricPoint {
                step: r.get::<i64, _>("step") as u64,
                loss: r.get("loss"),
                eval_loss: r.get("eval_loss"),
                lr: r.get("lr"),
                epoch: r.get("epoch"),
                grad_norm: r.get("grad_norm"),
                tokens_per_sec: r.get("tokens_per_sec"),
                elapsed_s: r.get("elapsed_s"),
                eta_s: r.get("eta_s"),
                total: r.get::<Option<i64>, _>("total").map(|t| t as u64),
                extra: json_map(r.get("extra")),
            })
            .collect())
    }

    /// Appends an event with the next sequence number of its run.
    pub async fn append_event(
        &self,
        id: i64,
        event: &RunEvent,
        worker_ts: Option<f64>,
    ) -> Result<RunEventMsg> {
        let payload = serde_json::to_string(&RunEventMsg {
            seq: 0,
            worker_ts,
            event: event.clone(),
        })?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO events (run_id, seq, payload) VALUES \
             (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id = ?1), ?2) RETURNING seq",
        )
        .bind(id)
        .bind(payload)
        .fetch_one(&self.pool)
        .await?;
        Ok(RunEventMsg {
            seq,
            worker_ts,
            event: event.clone(),
        })
    }

    pub async fn events_after(&self, id: i64, after: i64) -> Result<Vec<RunEventMsg>> {
        let rows = sqlx::query(
            "SELECT seq, payload FROM events WHERE run_id = ? AND seq > ? ORDER BY seq",
        )
        .bind(id)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let mut m: RunEventMsg = serde_json::from_str(r.get("payload")).ok()?;
                m.seq = r.get("seq");
                Some(m)
            })
            .collect())
    }

    pub async fn save_arg_set(&self, name: &str, config: &Map<String, Value>) -> Result<()> {
        sqlx::query(
            "INSERT INTO arg_sets (name, config, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET config = excluded.config, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(serde_json::to_string(config)?)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn arg_sets(&self) -> Result<Vec<ArgSet>> {
        let rows =
            sqlx::query("SELECT name, config, updated_at FROM arg_sets ORDER BY updated_at DESC")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| ArgSet {
                name: r.get("name"),
                config: json_map(r.get("config")),
                updated_at: r.get("updated_at"),
            })
            .collect())
    }

    pub async fn delete_arg_set(&self, name: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM arg_sets WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    pub async fn settings(&self) -> Result<Map<String, Value>> {
        let rows = sqlx::query("SELECT key, value FROM settings")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let v: String = r.get("value");
                (
                    r.get::<String, _>("key"),
                    serde_json::from_str(&v).unwrap_or(Value::String(v)),
                )
            })
            .collect())
    }

    pub async fn set_setting(&self, key: &str, value: &Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(serde_json::to_string(value)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unknown_status_or_kind_in_the_database_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("runs.db")).await.unwrap();
        let config = Map::new();
        let new = |kind| NewRun {
            kind,
            config: &config,
            output_dir: "out",
            model: "m",
            dataset: "d",
        };
        let id = db.insert_run(new(RunKind::Train), "").await.unwrap();
        assert_eq!(db.run(id).await.unwrap().unwrap().status, RunStatus::Queued);
        // A newer server's state, say (its schema allows more values than ours).
        let sql = format!(
            "PRAGMA ignore_check_constraints = ON; UPDATE runs SET status = 'paused' WHERE id = {id}"
        );
        sqlx::raw_sql(&sql).execute(&db.pool).await.unwrap();
        let e = db.run(id).await.unwrap_err().to_string();
        assert!(e.contains("unknown status `paused`"), "{e}");
        assert!(db.runs(&RunFilter::default()).await.is_err());
        let other = db.insert_run(new(RunKind::Export), "").await.unwrap();
        let sql = format!(
            "PRAGMA ignore_check_constraints = ON; UPDATE runs SET kind = 'distill' WHERE id = {other}"
        );
        sqlx::raw_sql(&sql).execute(&db.pool).await.unwrap();
        let e = db.run(other).await.unwrap_err().to_string();
        assert!(e.contains("unknown kind `distill`"), "{e}");
    }

    #[tokio::test]
    async fn a_transition_happens_once_and_only_from_the_states_given() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("runs.db")).await.unwrap();
        let config = Map::new();
        let id = db
            .insert_run(
                NewRun {
                    kind: RunKind::Train,
                    config: &config,
                    output_dir: "out",
                    model: "m",
                    dataset: "d",
                },
                "",
            )
            .await
            .unwrap();
        let stopped = RunStatus::STOPPED;
        assert!(!db
            .transition(id, &stopped, RunStatus::Queued)
            .await
            .unwrap());
        db.set_status(id, RunStatus::Aborted, None, Some("user"))
            .await
            .unwrap();
        assert!(db
            .transition(id, &stopped, RunStatus::Queued)
            .await
            .unwrap());
        assert!(!db
            .transition(id, &stopped, RunStatus::Queued)
            .await
            .unwrap());
        let run = db.run(id).await.unwrap().unwrap();
        assert_eq!((run.status, run.error), (RunStatus::Queued, None));
    }
}
