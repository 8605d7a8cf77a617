//! Reading the shop's totals back from the live views, to compare with what the generator says they
//! must be.

use std::collections::BTreeMap;

use sqlx::PgPool;

use super::generator::{DailyTotals, ExpectedTotals};
use crate::sink::{qualified, Context, Result};

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
    let mut out = Vec::new();
    if expected.orders != actual.orders {
        out.push(format!(
            "orders: expected {}, found {}",
            expected.orders, actual.orders
        ));
    }
    if expected.customers != actual.customers {
        out.push(format!(
            "customers: expected {}, found {}",
            expected.customers, actual.customers
        ));
    }
    diff_maps(
        "orders with status",
        &expected.orders_by_status,
        &actual.orders_by_status,
        &mut out,
    );
    diff_maps(
        "customers whose latest order is in",
        &expected.customers_by_currency,
        &actual.customers_by_currency,
        &mut out,
    );
    diff_maps(
        "lifetime value (cents) in",
        &expected.lifetime_value_cents,
        &actual.lifetime_value_cents,
        &mut out,
    );
    let mut daily_diffs = 0;
    for key in expected
        .daily_sales
        .keys()
        .chain(actual.daily_sales.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (e, a) = (expected.daily_sales.get(key), actual.daily_sales.get(key));
        if e.copied().unwrap_or_default() != a.copied().unwrap_or_default() {
            daily_diffs += 1;
            if daily_diffs <= 10 {
                out.push(format!("daily sales {key}: expected {e:?}, found {a:?}"));
            }
        }
    }
    if daily_diffs > 10 {
        out.push(format!("... and {} more days differ", daily_diffs - 10));
    }
    out
}

fn diff_maps<V: PartialEq + std::fmt::Debug + Default + Copy>(
    label: &str,
    expected: &BTreeMap<String, V>,
    actual: &BTreeMap<String, V>,
    out: &mut Vec<String>,
) {
    for key in expected
        .keys()
        .chain(actual.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (e, a) = (
            expected.get(key).copied().unwrap_or_default(),
            actual.get(key).copied().unwrap_or_default(),
        );
        if e != a {
            out.push(format!("{label} {key}: expected {e:?}, found {a:?}"));
        }
    }
}
