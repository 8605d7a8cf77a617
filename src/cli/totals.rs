//! `reproject check-totals`: compare the live shop views with the generator's expected totals.

use super::output::outln;
use anyhow::Context as _;
use clap::Args;

use super::{GlobalArgs, Outcome, Settings};
use crate::domain::shop::generator::ExpectedTotals;
use crate::domain::shop::totals::{actual_totals, differences};
use crate::engine::Tuning;

#[derive(Args, Debug)]
pub struct CheckTotalsArgs {
    /// The JSON file `seed --expected` wrote
    #[arg(long, value_name = "FILE")]
    pub expected: std::path::PathBuf,
}

pub async fn run(global: &GlobalArgs, args: CheckTotalsArgs) -> anyhow::Result<Outcome> {
    let settings = Settings::resolve(global)?;
    let text = std::fs::read_to_string(&args.expected)
        .with_context(|| format!("reading {}", args.expected.display()))?;
    let expected: ExpectedTotals = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an expected-totals file", args.expected.display()))?;
    let engine = settings.engine(Tuning::default()).await?;
    let actual = actual_totals(engine.catalog.pool(), &settings.view_schema).await?;
    Ok(print_comparison(&expected, &actual))
}

pub fn print_comparison(expected: &ExpectedTotals, actual: &ExpectedTotals) -> Outcome {
    outln!("{:<28} {:>16} {:>16}", "", "expected", "in the views");
    outln!(
        "{:<28} {:>16} {:>16}",
        "orders",
        expected.orders,
        actual.orders
    );
    for (status, n) in &expected.orders_by_status {
        outln!(
            "{:<28} {:>16} {:>16}",
            format!("  {status}"),
            n,
            actual.orders_by_status.get(status).copied().unwrap_or(0)
        );
    }
    outln!(
        "{:<28} {:>16} {:>16}",
        "customers",
        expected.customers,
        actual.customers
    );
    for (cur, n) in &expected.customers_by_currency {
        outln!(
            "{:<28} {:>16} {:>16}",
            format!("  latest order in {cur}"),
            n,
            actual.customers_by_currency.get(cur).copied().unwrap_or(0)
        );
    }
    for (cur, v) in &expected.lifetime_value_cents {
        outln!(
            "{:<28} {:>16} {:>16}",
            format!("lifetime value {cur} (cents)"),
            v,
            actual.lifetime_value_cents.get(cur).copied().unwrap_or(0)
        );
    }
    let sum = |t: &ExpectedTotals| t.daily_sales.values().map(|d| d.revenue_cents).sum::<i64>();
    outln!(
        "{:<28} {:>16} {:>16}",
        "days x currencies",
        expected.daily_sales.len(),
        actual.daily_sales.len()
    );
    outln!(
        "{:<28} {:>16} {:>16}",
        "revenue, all days (cents)",
        sum(expected),
        sum(actual)
    );
    let diffs = differences(expected, actual);
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
