//! How commands print what the engine reports: one printer per report, shared by every command that
//! shows it (`rebuild`, `demo` and `bench` print a rebuild; `swap` and `rollback` a swap).

use super::output::{out, outln};
use crate::engine::memory::size_text;
use crate::engine::rebuild::RebuildReport;
use crate::swap::SwapReport;

/// A rebuild: what it replayed, loaded and swapped, and the verification that gated each swap.
pub fn print_report(report: &RebuildReport) {
    let rate = report.events_replayed as f64 / report.replay_seconds.max(1e-9);
    outln!(
        "rebuilt {} (builds {:?}): {} events replayed in {:.2}s ({:.0}/s), {} rows loaded in {:.2}s, indexes {:.2}s, \
         caught up {} events in {:.2}s, swap {:.2}s",
        report.projections.join(", "),
        report.builds,
        report.events_replayed,
        report.replay_seconds,
        rate,
        report.rows_loaded,
        report.load_seconds,
        report.index_seconds,
        report.catch_up_events,
        report.catch_up_seconds,
        report.swap_seconds
    );
    for s in &report.swaps {
        outln!(
            "  {} now reads build {}{} (swap took {} attempt(s), {:.1} ms to commit)",
            s.projection,
            s.build_id,
            s.retired_build_id
                .map(|r| format!("; build {r} retired, kept for rollback"))
                .unwrap_or_default(),
            s.attempts,
            s.commit_ms
        );
    }
    if report.aggregates_indexed > 0 {
        outln!(
            "  aggregate index: {} aggregates recorded in {:.2}s (for `reproject replay`)",
            report.aggregates_indexed,
            report.aggregate_index_seconds
        );
    }
    if report.events_replayed > 0 {
        outln!(
            "  the fold peaked at {}{}",
            size_text(report.peak_fold_bytes),
            if report.spills > 0 {
                format!(
                    " and was flushed to PostgreSQL {} time(s) to stay within --memory-budget",
                    report.spills
                )
            } else {
                String::new()
            }
        );
    }
    if let (Some(budget), rss) = (report.memory_budget, report.peak_rss_bytes) {
        outln!(
            "  the process peaked at {} resident, {} its --memory-budget of {}",
            size_text(rss),
            if rss <= budget { "within" } else { "over" },
            size_text(budget)
        );
    }
    if report.dead_letters > 0 {
        outln!(
            "  {} bad record(s) passed over and kept in reproject.dead_letters (`reproject dead-letters list`)",
            report.dead_letters
        );
    }
    if report.history_truncated {
        outln!("  warning: built from a truncated log (--allow-truncated-history); events before the log start are missing");
    }
    for verification in &report.verifications {
        out!("\n{}", verification.render());
    }
}

/// `order_summary now reads build 4; build 1 retired (1 attempt(s), 4.2 ms to commit)`.
pub fn print_swapped(report: &SwapReport, what: &str, after: &str) {
    outln!(
        "{} {what} {}{after}{} ({} attempt(s), {:.1} ms to commit)",
        report.projection,
        report.build_id,
        report
            .retired_build_id
            .map(|r| format!("; build {r} retired"))
            .unwrap_or_default(),
        report.attempts,
        report.commit_ms
    );
}
