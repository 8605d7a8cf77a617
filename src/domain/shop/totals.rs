//! Reading the shop's totals back from the live views, to compare with what the generator says they
//! must be.

use sqlx::PgPool;

use super::generator::{DailyTotals, ExpectedTotals};
use reproject::domain::Totals;
use reproject::sink::{qualified, Context, Result};

/// The same figures as [`ExpectedTotals`], from the views in `view_schema`.
pub async fn actual_totals(pool: &PgPool, view_schema: &str) -> Result<ExpectedTotals> {
    let orders = qualified(view_schema, "order_summary");
    let customers = qualified(view_schema, "customer_stats");
    let daily = qualified(view_schema, "daily_sales");
    let by_status: Vec<(Option<String>, i64)> = sqlx::query_as(&format!(
        "SELECT status, count(*) FROM {orders} GROUP BY status"
    ))
    .fetch_all(pool)
    .await
    .context(|| format!("counting orders per status in {orders}"))?;
    let value: Vec<(Option<String>, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT currency, sum(lifetime_value_cents)::bigint FROM {customers} GROUP BY currency"
    ))
    .fetch_all(pool)
    .await
    .context(|| format!("summing lifetime value in {customers}"))?;
    let by_currency: Vec<(Option<String>, i64)> = sqlx::query_as(&format!(
        "SELECT currency, count(*) FROM {customers} GROUP BY currency"
    ))
    .fetch_all(pool)
    .await
    .context(|| format!("counting {customers} per currency"))?;
    let days: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(&format!(
        "SELECT to_char(day, 'YYYY-MM-DD') || ' ' || currency, orders_placed, orders_paid, revenue_cents, refunded_cents FROM {daily}"
    ))
    .fetch_all(pool)
    .await
    .context(|| format!("reading {daily}"))?;
    let mut totals = ExpectedTotals::default();
    for (status, n) in by_status {
        totals.orders += n as u64;
        *totals
            .orders_by_status
            .entry(status.unwrap_or_else(|| "(none)".into()))
            .or_default() += n as u64;
    }
    for (currency, n) in by_currency {
        totals.customers += n as u64;
        totals
            .customers_by_currency
            .insert(currency.unwrap_or_else(|| "(none)".into()), n as u64);
    }
    totals.lifetime_value_cents = value
        .into_iter()
        .map(|(c, v)| (c.unwrap_or_else(|| "(none)".into()), v.unwrap_or(0)))
        .collect();
    totals.daily_sales = days
        .into_iter()
        .map(
            |(k, orders_placed, orders_paid, revenue_cents, refunded_cents)| {
                (
                    k,
                    DailyTotals {
                        orders_placed,
                        orders_paid,
                        revenue_cents,
                        refunded_cents,
                    },
                )
            },
        )
        .collect();
    Ok(totals)
}

/// Every difference between expected and actual, as readable lines. Empty when they agree.
pub fn differences(expected: &ExpectedTotals, actual: &ExpectedTotals) -> Vec<String> {
    figures(expected).differences(&figures(actual))
}

/// The shop's totals as named figures, the form `check-totals` and the demo compare: counts and sums
/// printed one per line, and every day's sales compared as detail.
pub fn figures(totals: &ExpectedTotals) -> Totals {
    let mut out = Totals {
        events: totals.events,
        events_by_version: totals.events_by_version.clone(),
        figures: Vec::new(),
    };
    out.figure("orders", totals.orders as i64);
    for (status, n) in &totals.orders_by_status {
        out.figure(format!("  orders {status}"), *n as i64);
    }
    out.figure("customers", totals.customers as i64);
    for (currency, n) in &totals.customers_by_currency {
        out.figure(format!("  latest order in {currency}"), *n as i64);
    }
    for (currency, cents) in &totals.lifetime_value_cents {
        out.figure(format!("lifetime value {currency} (cents)"), *cents);
    }
    out.figure("days x currencies", totals.daily_sales.len() as i64);
    out.figure(
        "revenue, all days (cents)",
        totals.daily_sales.values().map(|d| d.revenue_cents).sum(),
    );
    for (day, d) in &totals.daily_sales {
        out.detail(format!("daily sales {day}: orders placed"), d.orders_placed);
        out.detail(format!("daily sales {day}: orders paid"), d.orders_paid);
        out.detail(
            format!("daily sales {day}: revenue (cents)"),
            d.revenue_cents,
        );
        out.detail(
            format!("daily sales {day}: refunded (cents)"),
            d.refunded_cents,
        );
    }
    out
}
