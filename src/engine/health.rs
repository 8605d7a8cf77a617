//! Whether this process can serve: what `/readyz` answers (and `/healthz`, that it answers at all).
//!
//! Readiness is read from the same places a reader of the views depends on, each time it is asked:
//! PostgreSQL answers, the brokers answer, no projection is paused, and every projection's view is
//! served by an active build that lags the log end by at most `--lag-threshold` events (the lag
//! at which a rebuild counts as caught up and swaps). Nothing here is cached between probes, so
//! an orchestrator sees a lost database at its next probe, not at the next batch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use serde::Serialize;

use super::Engine;
use crate::sink::Catalog;
use crate::source::{KafkaSettings, Topics};

/// How long one check may take before it counts as failed: well under an orchestrator's probe
/// timeout (Kubernetes' default is 1 s per probe, usually raised to a few).
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);
const BROKERS_TIMEOUT: Duration = Duration::from_secs(3);

/// What the checks need, taken from the command's engine once it has connected.
struct Source {
    catalog: Catalog,
    kafka: KafkaSettings,
    topics: Topics,
    /// Projection names and the version this binary's code has.
    projections: Vec<(String, u32)>,
    max_lag: i64,
    /// One client for every probe (making one per probe asks the brokers for metadata each time);
    /// held while a probe waits for the brokers, so probes never pile up behind a dead broker.
    consumer: Arc<Mutex<Option<BaseConsumer>>>,
}

static SOURCE: OnceLock<Source> = OnceLock::new();

/// Make `/readyz` answer for `engine`'s projections. The first engine a command connects wins.
pub fn register<E>(engine: &Engine<E>) {
    let _ = SOURCE.set(Source {
        catalog: engine.catalog.clone(),
        kafka: engine.kafka.clone(),
        topics: engine.topics.clone(),
        projections: engine
            .projections
            .iter()
            .map(|p| (p.name().to_string(), p.version()))
            .collect(),
        max_lag: engine.tuning.lag_threshold,
        consumer: Arc::new(Mutex::new(None)),
    });
}

/// `/readyz`'s answer: ready only when every check passed.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: BTreeMap<&'static str, Check>,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub ok: bool,
    /// What was found, in a sentence an operator can act on.
    pub detail: String,
}

impl Readiness {
    fn add(&mut self, name: &'static str, result: Result<String, String>) {
        let (ok, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        self.ready &= ok;
        self.checks.insert(name, Check { ok, detail });
    }
}

/// Run every check now.
pub async fn readiness() -> Readiness {
    let mut out = Readiness {
        ready: true,
        checks: BTreeMap::new(),
    };
    let Some(source) = SOURCE.get() else {
        out.add(
            "started",
            Err("the command has not connected to PostgreSQL and the brokers yet".into()),
        );
        return out;
    };
    let (database, log_end) = tokio::join!(database(source), log_end(source));
    out.add("database", database.map(|()| "PostgreSQL answers".into()));
    out.add(
        "brokers",
        log_end
            .as_ref()
            .map(|end| format!("{} partitions of {}", end.len(), source.topics))
            .map_err(Clone::clone),
    );
    if !out.checks["database"].ok {
        let unknown = || Err("unknown while PostgreSQL does not answer".to_string());
        out.add("not_paused", unknown());
        out.add("caught_up", unknown());
        return out;
    }
    out.add("not_paused", not_paused(source).await);
    out.add(
        "caught_up",
        match &log_end {
            Ok(end) => caught_up(source, end).await,
            Err(_) => Err("unknown while the brokers do not answer".into()),
        },
    );
    out
}

async fn database(source: &Source) -> Result<(), String> {
    match tokio::time::timeout(
        DATABASE_TIMEOUT,
        sqlx::query("SELECT 1").execute(source.catalog.pool()),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("PostgreSQL: {e}")),
        Err(_) => Err(format!(
            "PostgreSQL did not answer within {} s",
            DATABASE_TIMEOUT.as_secs()
        )),
    }
}

/// Each partition's log end (by partition id), asked of the brokers now.
async fn log_end(source: &Source) -> Result<BTreeMap<i32, i64>, String> {
    let (kafka, topics, consumer) = (
        source.kafka.clone(),
        source.topics.clone(),
        source.consumer.clone(),
    );
    let ask = tokio::task::spawn_blocking(move || {
        let Ok(mut slot) = consumer.try_lock() else {
            return Err("the previous probe is still waiting for the brokers".to_string());
        };
        if slot.is_none() {
            *slot = Some(
                kafka
                    .metadata_client("reproject-health")
                    .map_err(|e| e.to_string())?,
            );
        }
        let Some(consumer) = slot.as_ref() else {
            return Err("no Kafka client".to_string());
        };
        let partitions = kafka
            .partitions(consumer, &topics)
            .map_err(|e| e.to_string())?;
        kafka
            .bounds(consumer, &topics, &partitions)
            .map(|b| b.end)
            .map_err(|e| e.to_string())
    });
    match tokio::time::timeout(BROKERS_TIMEOUT, ask).await {
        Ok(Ok(result)) => result.map_err(|e| format!("brokers {}: {e}", source.kafka.brokers)),
        Ok(Err(e)) => Err(format!("asking the brokers failed: {e}")),
        Err(_) => Err(format!(
            "brokers {} did not answer within {} s",
            source.kafka.brokers,
            BROKERS_TIMEOUT.as_secs()
        )),
    }
}

async fn not_paused(source: &Source) -> Result<String, String> {
    let names: Vec<&str> = source.projections.iter().map(|(n, _)| n.as_str()).collect();
    match source.catalog.paused(&names).await {
        Ok(paused) if paused.is_empty() => Ok("no projection is paused".into()),
        Ok(paused) => Err(format!(
            "paused by `reproject pause`: {}",
            paused.join(", ")
        )),
        Err(e) => Err(e.to_string()),
    }
}

async fn caught_up(source: &Source, log_end: &BTreeMap<i32, i64>) -> Result<String, String> {
    let mut problems = Vec::new();
    let mut lags = Vec::new();
    for (name, version) in &source.projections {
        let build = match source.catalog.active_build(name).await {
            Ok(Some(build)) => build,
            Ok(None) => {
                problems.push(format!("{name} has no active build yet"));
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        let positions = source
            .catalog
            .positions(build.build_id)
            .await
            .map_err(|e| e.to_string())?;
        let lag: i64 = log_end
            .iter()
            .map(|(id, end)| (end - positions.get(id).copied().unwrap_or(0)).max(0))
            .sum();
        let serving = if build.version == *version {
            String::new()
        } else {
            format!(", serving v{} while v{version} is built", build.version)
        };
        if lag > source.max_lag {
            problems.push(format!(
                "{name} lags {lag} events (ready at {} or fewer){serving}",
                source.max_lag
            ));
        } else {
            lags.push(format!("{name} lags {lag}{serving}"));
        }
    }
    if problems.is_empty() {
        Ok(lags.join("; "))
    } else {
        Err(problems.join("; "))
    }
}
