//! `reproject run`: keep projections current and backfill new versions.

use std::sync::Arc;

use clap::Args;

use super::args::{MemoryArgs, SwapArgs, TuningArgs};
use super::{shutdown_token, Cx, Outcome};
use crate::domain::Domain;
use crate::engine::rebuild::RebuildOptions;
use crate::engine::run::{self, RunOptions};
use crate::engine::EngineError;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Only follow active builds; do not backfill missing or outdated projection versions
    #[arg(long)]
    pub no_backfill: bool,
    /// Exit once everything is active and lags by at most this many events (for scripts and tests)
    #[arg(long, value_name = "EVENTS")]
    pub exit_when_caught_up: Option<i64>,
    /// Rebuild even though the log no longer starts at offset 0
    #[arg(long)]
    pub allow_truncated_history: bool,
    /// Share the follow, and the backfills, with every other `run --shared` process of the same
    /// projections and database, here or on other machines: Kafka's consumer group gives each its
    /// partitions, and the others take over a process's partitions when it stops
    #[arg(long)]
    pub shared: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub swap: SwapArgs,
    #[command(flatten)]
    pub verify: super::args::VerifyArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: RunArgs) -> anyhow::Result<Outcome> {
    let shutdown = shutdown_token();
    let mut domain = cx.domain.clone();
    loop {
        let now = Cx {
            global: cx.global.clone(),
            domain: domain.clone(),
        };
        let settings = now.settings()?;
        let engine = Arc::new(now.writing_engine(&settings, args.tuning.tuning()).await?);
        let drift = crate::engine::drift(&engine.catalog, &engine.definitions).await?;
        for stale in drift.stale_inputs {
            tracing::warn!(message = "the domain's schemas or upcasters changed", build = %stale);
        }
        let options = RunOptions {
            backfill: !args.no_backfill,
            rebuild: RebuildOptions {
                allow_truncated_history: args.allow_truncated_history,
                swap: true,
                swap_options: args.swap.options(&settings),
                quiet: true,
                memory_budget: args.memory.memory_budget,
                disk_budget: args.memory.disk_budget.map(|b| b as u64),
                verify: args.verify.policy(),
            },
            exit_when_caught_up: args.exit_when_caught_up,
            shared: args.shared,
        };
        let round = shutdown.child_token();
        let watcher = tokio::spawn(watch_definitions(
            domain.clone(),
            engine.catalog.clone(),
            round.clone(),
        ));
        let result = run::run(engine, options, round.clone()).await;
        round.cancel();
        let reloaded = watcher.await.ok().flatten();
        match (result, reloaded) {
            (Ok(()) | Err(EngineError::Interrupted), Some(next)) if !shutdown.is_cancelled() => {
                domain = Arc::new(next)
            }
            (result, _) => {
                result?;
                return Ok(Outcome::Success);
            }
        }
    }
}

/// How often `run` looks whether a domain's files changed.
const LOOK_FOR_CHANGED_FILES_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Until `round` ends, read the domain's files again whenever they change (a compiled domain never
/// does). Changed files that are right, and that change no version builds were made from, end the
/// round and are returned: `run` goes on with them, backfilling a new view or version from offset
/// zero while the others keep being followed from their stored positions. Files with problems are
/// reported once and the running views go on as they were.
async fn watch_definitions<D: Domain>(
    domain: Arc<D>,
    catalog: crate::sink::Catalog,
    round: tokio_util::sync::CancellationToken,
) -> Option<D> {
    let mut reported = String::new();
    loop {
        tokio::select! {
            _ = round.cancelled() => return None,
            _ = tokio::time::sleep(LOOK_FOR_CHANGED_FILES_EVERY) => {}
        }
        let current = domain.clone();
        let reloaded = match tokio::task::spawn_blocking(move || current.reload()).await {
            Ok(Some(reloaded)) => reloaded,
            _ => continue,
        };
        let problem = match reloaded {
            Ok(next) => {
                match crate::engine::refuse_edited_definitions(&catalog, &next.definitions()).await
                {
                    Ok(()) => {
                        tracing::info!(
                            message = "the domain's files changed; going on with them",
                            projections = %next.projections().iter().map(|p| format!("{} v{}", p.name(), p.version())).collect::<Vec<_>>().join(", ")
                        );
                        round.cancel();
                        return Some(next);
                    }
                    Err(refused) => refused.to_string(),
                }
            }
            Err(problems) => problems,
        };
        if problem != reported {
            tracing::error!(
                message = "the domain's files changed and are refused; the running views go on as they were",
                problem = %problem
            );
            reported = problem;
        }
    }
}
