//! `reproject replay <aggregate-id>`: why does this aggregate's row look the way it does?

use super::output::outln;
use clap::Args;

use super::args::{Format, PartitionerArg};
use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::engine::timeline::{self, Locate, Timeline, TraceOptions, Verdict};
use crate::engine::Tuning;

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The aggregate id (the record key)
    pub aggregate_id: String,
    /// Only this projection [default: every projection]
    #[arg(long)]
    pub projection: Option<String>,
    /// The partitioner the producers use, to find the key's partition
    #[arg(long, value_enum, default_value_t = PartitionerArg::ConsistentRandom)]
    pub partitioner: PartitionerArg,
    /// Read every partition (when the producers' partitioner is unknown)
    #[arg(long)]
    pub scan_all: bool,
    /// Also write the computed rows into the schema rp_replay_<projection>, for inspection with SQL
    #[arg(long)]
    pub scratch: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: ReplayArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = cx.writing_engine(&settings, Tuning::default()).await?;
    let projections = match &args.projection {
        Some(name) => vec![engine.projection(name)?],
        None => engine.projections.clone(),
    };
    let options = TraceOptions {
        aggregate_id: args.aggregate_id.clone(),
        projections,
        locate: if args.scan_all {
            Locate::ScanAll
        } else {
            Locate::Partitioner(args.partitioner.into())
        },
        scratch: args.scratch,
    };
    let timeline = timeline::trace(&engine, &options).await?;
    match args.format {
        Format::Text => print_text(&timeline),
        Format::Json => print_json(&timeline)?,
    }
    // Differences are a finding, not a failure of the command: exit 1 like `check-totals`.
    let differs = timeline
        .comparisons
        .iter()
        .any(|c| c.verdict == Verdict::Differ);
    Ok(if differs || !timeline.sequence.is_clean() {
        Outcome::Failed
    } else {
        Outcome::Success
    })
}

fn print_json(t: &Timeline) -> anyhow::Result<()> {
    use serde_json::json;
    let mut lines = Vec::new();
    for e in &t.events {
        lines.push(json!({"kind": "event", "aggregate_id": t.aggregate_id, "event": e}));
    }
    lines.push(
        json!({"kind": "sequence_check", "aggregate_id": t.aggregate_id, "check": t.sequence}),
    );
    for c in &t.comparisons {
        lines.push(json!({"kind": "comparison", "aggregate_id": t.aggregate_id, "comparison": c}));
    }
    lines.push(json!({
        "kind": "summary",
        "topics": t.topics,
        "aggregate_id": t.aggregate_id,
        "events": t.events.len(),
        "read": t.read,
        "scratch_schema": t.scratch_schema,
    }));
    for line in lines {
        outln!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}

fn print_text(t: &Timeline) {
    outln!(
        "aggregate {} in {}: {} events, found via {} ({} records read in {:.3}s from {})",
        t.aggregate_id,
        t.topics.join(", "),
        t.events.len(),
        t.read.located_by,
        t.read.records_scanned,
        t.read.seconds,
        t.read
            .ranges
            .iter()
            .map(|r| format!("{}/{}:{}..{}", r.topic, r.partition, r.from, r.to))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (n, e) in t.events.iter().enumerate() {
        outln!(
            "\n#{} {}/{} offset {}  {}  seq {}  event {}",
            n + 1,
            e.topic,
            e.partition,
            e.offset,
            e.occurred_at,
            e.sequence,
            e.event_id
        );
        for (i, step) in e.steps.iter().enumerate() {
            let label = if i == 0 { "stored " } else { "upcast ->" };
            outln!("  {label} {}  {}", step.message, step.payload);
        }
        if let Some(error) = &e.error {
            outln!("  ERROR {error}");
        }
        for p in &e.projections {
            for change in &p.changes {
                outln!("  {}: {change}", p.projection);
            }
            for row in &p.rows {
                match &row.row {
                    Some(r) => outln!(
                        "    => {}[{}] {}",
                        row.table,
                        row.key,
                        serde_json::Value::Object(r.clone())
                    ),
                    None => outln!("    => {}[{}] deleted", row.table, row.key),
                }
            }
        }
    }
    outln!();
    let s = &t.sequence;
    if s.is_clean() {
        outln!(
            "sequence numbers: 1..{} without gaps or repeats; no event id twice",
            t.events.len()
        );
    } else {
        for (from, to) in &s.gaps {
            outln!("sequence gap: {from}..{to} missing");
        }
        for seq in &s.repeats {
            outln!("sequence repeat: {seq} seen more than once");
        }
        for (id, at) in &s.duplicate_event_ids {
            outln!("event id {id} seen {} times, at {at:?}", at.len());
        }
    }
    for c in &t.comparisons {
        match c.verdict {
            Verdict::Agree => outln!("{} [{}]: the live row agrees with the replay", c.view, c.key),
            Verdict::SharedRow => outln!(
                "{} [{}]: gathers other aggregates' events too; this aggregate's part is shown above, not compared",
                c.view, c.key
            ),
            Verdict::Differ => {
                outln!("{} [{}]: the live row DIFFERS from the replay", c.view, c.key);
                outln!("    {:<24} {:<40} live", "column", "replayed");
                for (column, computed, live) in &c.differences {
                    outln!("    {column:<24} {computed:<40} {live}");
                }
            }
        }
    }
    if let Some(schema) = &t.scratch_schema {
        outln!("computed rows written to schema {schema}");
    }
}
