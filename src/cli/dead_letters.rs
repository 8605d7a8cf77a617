//! `reproject dead-letters list|show|retry`: the records builds passed over under
//! `--on-bad-record dead-letter`, and re-applying them once their cause is fixed.

use super::output::outln;
use clap::{Args, Subcommand};

use super::args::Format;
use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::engine::Tuning;
use crate::sink::dead_letters::{self, StoredDeadLetter};

#[derive(Args, Debug)]
pub struct DeadLettersArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// List dead letters, oldest first (unresolved ones unless --all)
    List {
        /// Only this projection's
        projection: Option<String>,
        /// Include resolved ones
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show one dead letter whole: where it was, what was wrong, the record's bytes, and its envelope
    Show {
        id: i64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Apply a projection's unresolved dead letters (or only IDS) with this binary's upcasters and
    /// projection code, after fixing what refused them
    Retry { projection: String, ids: Vec<i64> },
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: DeadLettersArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let engine = match args.action {
        Action::Retry { .. } => cx.writing_engine(&settings, Tuning::default()).await?,
        _ => cx.engine(&settings, Tuning::default()).await?,
    };
    let mut conn = engine.catalog.conn().await?;
    match args.action {
        Action::List {
            projection,
            all,
            format,
        } => {
            if let Some(p) = &projection {
                engine.projection(p)?;
            }
            let letters = dead_letters::list(&mut conn, projection.as_deref(), all).await?;
            match format {
                Format::Json => {
                    for l in &letters {
                        outln!("{}", serde_json::to_string(l)?);
                    }
                }
                Format::Text => print_list(&letters),
            }
            Ok(Outcome::Success)
        }
        Action::Show { id, format } => {
            let letter = dead_letters::get(&mut conn, id).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "there is no dead letter {id}; `reproject dead-letters list --all` lists them"
                )
            })?;
            match format {
                Format::Json => {
                    let mut json = serde_json::to_value(&letter)?;
                    json["record_key_hex"] =
                        hex(letter.record_key.as_deref().unwrap_or_default()).into();
                    json["record_value_hex"] = hex(&letter.record_value).into();
                    outln!("{json}");
                }
                Format::Text => print_one(&letter),
            }
            Ok(Outcome::Success)
        }
        Action::Retry { projection, ids } => {
            drop(conn);
            let report = crate::engine::dead_letters::retry(&engine, &projection, &ids).await?;
            outln!(
                "{projection}: {} applied, {} duplicates resolved without applying, {} still failing, {} skipped",
                report.applied.len(),
                report.duplicates.len(),
                report.still_failing.len(),
                report.skipped.len()
            );
            for (id, error) in &report.still_failing {
                outln!("  #{id} still fails: {error}");
            }
            for (id, why) in &report.skipped {
                outln!("  #{id} skipped: {why}");
            }
            Ok(if report.still_failing.is_empty() {
                Outcome::Success
            } else {
                Outcome::Failed
            })
        }
    }
}

fn print_list(letters: &[StoredDeadLetter]) {
    if letters.is_empty() {
        outln!("no dead letters");
        return;
    }
    outln!(
        "{:>6}  {:<16} {:>6}  {:<24} {:<9} {:<10} reason",
        "id",
        "projection",
        "build",
        "topic/partition@offset",
        "kind",
        "state"
    );
    for l in letters {
        let state = match (&l.resolved_at, &l.retry_error) {
            (Some(_), _) => "resolved",
            (None, Some(_)) => "retried",
            (None, None) => "new",
        };
        outln!(
            "{:>6}  {:<16} {:>6}  {:<24} {:<9} {:<10} {}",
            l.dead_letter_id,
            l.projection,
            l.build_id,
            format!("{}/{}@{}", l.topic, l.partition, l.offset),
            l.kind,
            state,
            l.retry_error.as_deref().unwrap_or(&l.reason)
        );
    }
}

fn print_one(l: &StoredDeadLetter) {
    outln!(
        "dead letter {} of {} (build {})",
        l.dead_letter_id,
        l.projection,
        l.build_id
    );
    outln!(
        "  where:      {} partition {} offset {}",
        l.topic,
        l.partition,
        l.offset
    );
    outln!(
        "  type:       {} (version {})",
        l.type_url.as_deref().unwrap_or("-"),
        l.version.map_or("-".to_string(), |v| v.to_string())
    );
    outln!("  kind:       {}", l.kind);
    outln!("  error:      {}", l.reason);
    if let Some(id) = l.event_id {
        outln!("  event id:   {id}");
    }
    outln!("  recorded:   {}", l.recorded_at);
    if let Some(at) = l.retried_at {
        outln!(
            "  retried:    {at}: {}",
            l.retry_error.as_deref().unwrap_or("applied")
        );
    }
    if let Some(at) = l.resolved_at {
        outln!("  resolved:   {at}");
    }
    match &l.record_key {
        Some(key) => outln!("  key:        {:?}", String::from_utf8_lossy(key)),
        None => outln!("  key:        (none)"),
    }
    outln!("  value:      {} bytes", l.record_value.len());
    for (i, chunk) in l.record_value.chunks(32).enumerate().take(16) {
        outln!("    {:04x}  {}", i * 32, hex(chunk));
    }
    if l.record_value.len() > 512 {
        outln!("    ... (--format json has all of it)");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
