//! `reproject check-totals`: compare the live views with the totals the domain's example generator
//! computed on its own (`seed --expected`).

use super::output::outln;
use anyhow::Context as _;
use clap::Args;

use super::{Cx, Outcome};
use crate::domain::{Domain, Totals};
use crate::engine::Tuning;

#[derive(Args, Debug)]
pub struct CheckTotalsArgs {
    /// The JSON file `seed --expected` wrote
    #[arg(long, value_name = "FILE")]
    pub expected: std::path::PathBuf,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: CheckTotalsArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let example = cx.example("check-totals")?;
    let text = std::fs::read_to_string(&args.expected)
        .with_context(|| format!("reading {}", args.expected.display()))?;
    let expected: Totals = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an expected-totals file", args.expected.display()))?;
    let engine = cx.engine(&settings, Tuning::default()).await?;
    let actual = example
        .actual_totals(engine.catalog.pool(), &settings.view_schema)
        .await
        .with_context(|| {
            format!(
                "reading the totals of the views in {}",
                settings.view_schema
            )
        })?;
    Ok(print_comparison(&expected, &actual))
}

/// Every printed figure side by side, then the differences (detail figures included).
pub fn print_comparison(expected: &Totals, actual: &Totals) -> Outcome {
    outln!("{:<36} {:>16} {:>16}", "", "expected", "in the views");
    for figure in expected.figures.iter().filter(|f| !f.detail) {
        outln!(
            "{:<36} {:>16} {:>16}",
            figure.name,
            figure.value,
            actual.get(&figure.name)
        );
    }
    let diffs = expected.differences(actual);
    if diffs.is_empty() {
        outln!("\nall totals agree");
        Outcome::Success
    } else {
        outln!("\n{} difference(s):", diffs.len());
        for d in diffs {
            outln!("  {d}");
        }
        Outcome::Failed
    }
}
