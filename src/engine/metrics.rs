//! Prometheus metrics of `run` and `rebuild`, served over HTTP with `--metrics-addr` beside the
//! `/healthz` and `/readyz` probes.
//!
//! Names follow Prometheus conventions: a `reproject_` prefix, the unit in the name, `_total` for
//! counters. Updated per batch, never per event, so they cost nothing on the replay's hot path.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `reproject_events_read_total` | counter | topic, partition |
//! | `reproject_events_applied_total` | counter | projection, phase (replay, follow) |
//! | `reproject_rows_written_total` | counter | projection, phase (bulk_load, follow) |
//! | `reproject_lag_events` | gauge | projection, topic, partition |
//! | `reproject_batch_duration_seconds` | histogram | phase (follow) |
//! | `reproject_build_phase` | gauge, 1 for the build's current phase | projection, build, phase |
//! | `reproject_paused` | gauge, 1 while paused | projection |
//! | `reproject_max_rate_events_per_second` | gauge, the `--max-rate` cap, 0 when none | |
//! | `reproject_errors_total` | counter | kind (database_retry, kafka, bad_record) |
//! | `reproject_batches_cut_short_total` | counter: batches stopped mid-transaction because the throttle held writes (rolled back, written again later) | |
//! | `reproject_throttle_state` | gauge: 0 running, 1 slowed, 2 paused, 3 measuring production alone | |
//! | `reproject_throttle_load_ratio` | gauge: the highest signal as a share of its limit | |
//! | `reproject_throttle_signal_load_ratio` | gauge: each signal as a share of its limit | signal |
//! | `reproject_throttle_rate_events_per_second` | gauge: the rate the throttle allows, 0 when paused or unbounded | |
//! | `reproject_production_commits_per_second` | gauge: production's commits, reproject's taken out | |
//! | `reproject_production_alone_commits_per_second` | gauge: the same, measured with reproject quiet | |
//! | `reproject_production_probe_latency_seconds` | gauge: the probe's latency (the percentile) | |
//! | `reproject_production_alone_probe_latency_seconds` | gauge: the same, with reproject quiet | |

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Serve the metrics at `http://addr/metrics`, beside `/healthz` (the process answers: 200 `ok`)
/// and `/readyz` (200 when ready, 503 otherwise; JSON naming each check, see [`super::health`]).
/// Call once, inside the runtime; the server runs until the process exits.
pub async fn serve(addr: SocketAddr) -> Result<(), String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("serving metrics on {addr}: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("serving metrics on {addr}: {e}"))?;
    // Histograms drain their samples into summaries on upkeep; the exporter's own listener did it
    // on every scrape, this one does it on a timer as the exporter's docs ask.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(message = "the metrics and health endpoints stopped", %addr, %error);
        }
    });
    Ok(())
}

async fn readyz() -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let readiness = super::health::readiness().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string_pretty(&readiness)
        .unwrap_or_else(|e| format!("{{\"ready\": false, \"error\": \"{e}\"}}"));
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body + "\n",
    )
}

pub fn events_read(topic: &str, partition: i32, events: u64) {
    metrics::counter!("reproject_events_read_total", "topic" => topic.to_string(), "partition" => partition.to_string())
        .increment(events);
}

pub fn events_applied(projection: &str, phase: &'static str, events: u64) {
    metrics::counter!("reproject_events_applied_total", "projection" => projection.to_string(), "phase" => phase)
        .increment(events);
}

pub fn rows_written(projection: &str, phase: &'static str, rows: u64) {
    metrics::counter!("reproject_rows_written_total", "projection" => projection.to_string(), "phase" => phase)
        .increment(rows);
}

pub fn lag(projection: &str, topic: &str, partition: i32, lag: i64) {
    metrics::gauge!("reproject_lag_events", "projection" => projection.to_string(), "topic" => topic.to_string(), "partition" => partition.to_string())
        .set(lag as f64);
}

pub fn batch_duration(phase: &'static str, seconds: f64) {
    metrics::histogram!("reproject_batch_duration_seconds", "phase" => phase).record(seconds);
}

/// Mark `phase` as the build's current one (1) and every other phase 0.
pub fn build_phase(projection: &str, build_id: i64, phase: crate::sink::Phase) {
    use crate::sink::Phase::*;
    for p in [
        Loading, Indexing, CatchingUp, Ready, Active, Retired, Failed, Dropped,
    ] {
        metrics::gauge!("reproject_build_phase", "projection" => projection.to_string(), "build" => build_id.to_string(), "phase" => p.as_str())
            .set(if p == phase { 1.0 } else { 0.0 });
    }
}

pub fn paused(projection: &str, paused: bool) {
    metrics::gauge!("reproject_paused", "projection" => projection.to_string()).set(if paused {
        1.0
    } else {
        0.0
    });
}

pub fn max_rate(rate: Option<u64>) {
    metrics::gauge!("reproject_max_rate_events_per_second").set(rate.unwrap_or(0) as f64);
}

pub fn batch_cut_short() {
    metrics::counter!("reproject_batches_cut_short_total").increment(1);
}

pub fn error(kind: &'static str) {
    metrics::counter!("reproject_errors_total", "kind" => kind).increment(1);
}
