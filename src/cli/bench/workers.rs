//! `bench --workers N`: the same log rebuilt by N processes of this program sharing one build
//! (`rebuild --all --shared`), against one process on the same path, on this machine. The
//! processes are real ones, reaching the broker and the database over loopback as processes on
//! other machines would; what this machine cannot show is the speed-up of cores it does not have.

use std::ffi::OsString;
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use super::super::output::outln;
use super::super::Cx;
use crate::domain::Domain;

/// One shared rebuild: how many processes shared it and how long it took, from the first start
/// to the last exit.
#[derive(Debug, Default, Serialize, Clone)]
pub struct SharedRebuild {
    pub workers: usize,
    pub seconds: f64,
    pub events_per_second: f64,
    /// The largest peak resident set of one process (VmHWM, sampled every 100 ms until it
    /// exits), 0 where /proc is not available.
    pub largest_peak_rss_bytes: u64,
}

/// The arguments that point a child process at what this bench uses: the domain, its config and
/// SQL, the broker, the database, the topics and the stable views' schema; and the bench's memory
/// budget, which applies per process.
pub fn child_args<D: Domain>(
    cx: &Cx<D>,
    settings: &super::super::config::Settings,
    memory_budget: Option<usize>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let global = &cx.global;
    for (flag, value) in [
        ("--domain", &global.domain),
        ("--config", &global.config),
        ("--schema-dir", &global.schema_dir),
    ] {
        if let Some(value) = value {
            args.push(flag.into());
            args.push(value.into());
        }
    }
    for property in &global.kafka_property {
        args.push("-X".into());
        args.push(property.into());
    }
    for topic in &settings.topics {
        args.push("--topic".into());
        args.push(topic.into());
    }
    for (flag, value) in [
        ("--brokers", &settings.kafka.brokers),
        ("--database-url", &settings.database_url),
        ("--view-schema", &settings.view_schema),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    if let Some(budget) = memory_budget {
        args.push("--memory-budget".into());
        args.push(budget.to_string().into());
    }
    args.push("--quiet".into());
    args
}

/// Rebuild every projection with `workers` processes sharing the build, and time it.
pub async fn shared_rebuild(
    common: &[OsString],
    workers: usize,
    events: u64,
) -> anyhow::Result<SharedRebuild> {
    let program = std::env::current_exe().context("finding this program to start the workers")?;
    let started = Instant::now();
    let mut children = Vec::with_capacity(workers);
    for _ in 0..workers {
        let child = tokio::process::Command::new(&program)
            .args(["rebuild", "--all", "--shared"])
            .args(common)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} rebuild --all --shared", program.display()))?;
        children.push(child);
    }
    // A child's VmHWM is only readable while it runs: sample them all until the last exits.
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let done = sampling.clone();
        async move {
            let mut largest = 0u64;
            loop {
                largest = pids
                    .iter()
                    .filter_map(|&p| crate::engine::memory::peak_rss_bytes(Some(p)))
                    .fold(largest, u64::max);
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    _ = done.cancelled() => return largest,
                }
            }
        }
    });
    for (i, mut child) in children.into_iter().enumerate() {
        let status = child
            .wait()
            .await
            .with_context(|| format!("waiting for shared-rebuild worker {i}"))?;
        anyhow::ensure!(
            status.success(),
            "shared-rebuild worker {i} of {workers} exited with {status} (its errors are above)"
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    sampling.cancel();
    let largest_peak_rss_bytes = sampler.await.unwrap_or(0);
    outln!("   {workers} process(es) sharing one rebuild: {seconds:.1}s");
    Ok(SharedRebuild {
        workers,
        seconds,
        events_per_second: events as f64 / seconds,
        largest_peak_rss_bytes,
    })
}
