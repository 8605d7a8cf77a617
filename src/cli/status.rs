//! `reproject status`: builds, positions, lag and progress per projection.

use super::output::{out, outln};
use clap::Args;

use super::args::Format;
use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::engine::status::{self, BuildStatus, StatusReport};
use crate::engine::Tuning;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: StatusArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = cx.engine(&settings, Tuning::default()).await?;
    let report = status::collect(&engine).await?;
    match args.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => out!("{}", render(&report)),
    }
    Ok(Outcome::Success)
}

pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    match (&report.log_end, &report.broker_error) {
        (Some(end), _) => {
            for (topic, partitions) in end {
                out.push_str(&format!(
                    "topic {topic}: {} partitions, log end {} events\n",
                    partitions.len(),
                    partitions.values().sum::<i64>()
                ));
            }
        }
        (None, Some(e)) => out.push_str(&format!(
            "topic {}: brokers unreachable ({e}); lag unknown\n",
            report.topics.join(", ")
        )),
        _ => {}
    }
    if let Some(edited) = &report.edited_definitions {
        out.push_str(&format!(
            "EDITED VIEW FILES: {edited}; the commands that write refuse to run until the change \
             has a version file of its own\n"
        ));
    }
    if let Some(stale) = &report.stale_inputs {
        out.push_str(&format!("SCHEMAS OR UPCASTERS CHANGED: {stale}\n"));
    }
    for p in &report.projections {
        out.push_str(&format!(
            "\n{} (code v{}){}\n",
            p.name,
            p.code_version.map_or_else(|| "?".into(), |v| v.to_string()),
            if p.paused {
                "  PAUSED (`reproject resume` continues)"
            } else {
                ""
            }
        ));
        if p.tuned != Default::default() {
            out.push_str(&format!(
                "  tuned     {} (`reproject tune {} --clear` undoes it)\n",
                serde_json::to_string(&p.tuned).unwrap_or_default(),
                p.name
            ));
        }
        match &p.active {
            Some(b) => line(&mut out, "active", b),
            None => out.push_str("  active    none\n"),
        }
        for b in &p.building {
            line(&mut out, "building", b);
        }
        for b in &p.retired {
            line(&mut out, b.build.phase.as_str(), b);
        }
    }
    out
}

fn line(out: &mut String, label: &str, b: &BuildStatus) {
    out.push_str(&format!(
        "  {label:<9} build {:<4} v{:<3} {:<12} rows {:<10} lag {}",
        b.build.build_id,
        b.build.version,
        b.build.phase.as_str(),
        b.rows,
        b.lag.map_or_else(|| "-".into(), |l| l.to_string())
    ));
    use crate::sink::Phase;
    let in_use = matches!(
        b.build.phase,
        Phase::Loading | Phase::Indexing | Phase::CatchingUp | Phase::Ready | Phase::Active
    );
    if let (false, true, Some(w)) = (b.writer_running, in_use, &b.writer) {
        // Its last progress report may be seconds old and look live: say the writer is gone.
        out.push_str(&format!("  no writer running (last: {w})"));
    }
    if let Some(progress) = b.progress.as_ref().filter(|_| b.writer_running) {
        let fresh = b.progress_age_seconds.is_some_and(|a| a < 30.0);
        if fresh && b.build.phase != Phase::Retired {
            let rate = progress
                .get("events_per_second")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0);
            let eta = progress.get("eta_seconds").and_then(|v| v.as_f64());
            let phase = progress.get("phase").and_then(|v| v.as_str()).unwrap_or("");
            out.push_str(&format!("  {phase} {rate:.0} events/s"));
            if let Some(eta) = eta {
                out.push_str(&format!(" eta {eta:.0}s"));
            }
            if let Some(w) = &b.writer {
                out.push_str(&format!("  by {w}"));
            }
            if let Some(t) = progress.get("throttle").filter(|t| !t.is_null()) {
                let state = t.get("state").and_then(|v| v.as_str()).unwrap_or("?");
                let reason = t.get("reason").and_then(|v| v.as_str()).unwrap_or("");
                let rate = t
                    .get("rate")
                    .and_then(|v| v.as_f64())
                    .map_or_else(|| "none".into(), |r| format!("{r:.0} events/s"));
                out.push_str(&format!(
                    "\n            throttle {state}, rate {rate}: {reason}"
                ));
            }
        }
    }
    if b.build.history_truncated {
        out.push_str("  (built from a truncated log)");
    }
    out.push('\n');
    if let Some(e) = &b.last_error {
        out.push_str(&format!("            last error: {e}\n"));
    }
    if b.dead_letters > 0 {
        out.push_str(&format!(
            "            {} dead letter(s) unresolved: `reproject dead-letters list {}`\n",
            b.dead_letters, b.build.projection
        ));
    }
    for w in &b.workers {
        let partitions: Vec<String> = w.partitions.iter().map(i32::to_string).collect();
        out.push_str(&format!(
            "            worker {}: partitions [{}], {} events at {:.0} events/s, seen {:.0}s ago\n",
            w.worker,
            partitions.join(" "),
            w.events_replayed,
            w.events_per_second,
            w.seen_seconds_ago
        ));
    }
    if label != "retired" {
        for (topic, positions) in &b.positions {
            let parts: Vec<String> = positions.iter().map(|(p, o)| format!("{p}:{o}")).collect();
            out.push_str(&format!(
                "            next offsets {topic} {}\n",
                parts.join(" ")
            ));
        }
    }
}
