//! The ledger's figures read back from the live views, named as [`crate::generator`] names them.

use reproject::domain::Totals;
use reproject::sink::qualified;
use reproject::sqlx::{self, PgPool};

use crate::generator::CURRENCIES;

pub async fn actual(pool: &PgPool, view_schema: &str) -> anyhow::Result<Totals> {
    let balances = qualified(view_schema, "account_balances");
    let daily = qualified(view_schema, "daily_volume");
    let transfers = qualified(view_schema, "transfers");
    let read = |what: &str, table: &str| format!("reading {what} from {table}");

    let mut totals = Totals::default();
    let (accounts, open): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE status IS NOT NULL), count(*) FILTER (WHERE status = 'open') FROM {balances}"
    ))
    .fetch_one(pool)
    .await
    .map_err(|e| anyhow::anyhow!("{}: {e}", read("accounts", &balances)))?;
    totals.figure("accounts", accounts);
    totals.figure("  open", open);
    totals.figure("  closed", accounts - open);
    let posted: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {transfers}"))
        .fetch_one(pool)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", read("transfers", &transfers)))?;
    totals.figure("transfers", posted);
    let overdrawn: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {balances} WHERE balance_micros < 0"
    ))
    .fetch_one(pool)
    .await
    .map_err(|e| anyhow::anyhow!("{}: {e}", read("overdrawn accounts", &balances)))?;
    totals.figure("accounts overdrawn", overdrawn);
    for currency in CURRENCIES {
        let positive: i64 = sqlx::query_scalar(&format!(
            "SELECT coalesce(sum(balance_micros), 0)::bigint FROM {balances} WHERE currency = $1 AND balance_micros > 0"
        ))
        .bind(currency)
        .fetch_one(pool)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", read("balances", &balances)))?;
        totals.figure(
            format!("positive balances in {currency} (micros)"),
            positive,
        );
        let (volume, largest): (i64, i64) = sqlx::query_as(&format!(
            "SELECT coalesce(sum(volume_micros), 0)::bigint, coalesce(max(largest_micros), 0) FROM {daily} WHERE currency = $1"
        ))
        .bind(currency)
        .fetch_one(pool)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", read("volumes", &daily)))?;
        totals.figure(format!("volume in {currency} (micros)"), volume);
        totals.figure(format!("largest transfer in {currency} (micros)"), largest);
    }
    let days: Vec<(String, String, i64, i64, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT to_char(day, 'YYYY-MM-DD'), currency, transfers, volume_micros, largest_micros FROM {daily} ORDER BY 1, 2"
    ))
    .fetch_all(pool)
    .await
    .map_err(|e| anyhow::anyhow!("{}: {e}", read("days", &daily)))?;
    totals.figure("days x currencies", days.len() as i64);
    let accounts: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT account_id, balance_micros, transfers FROM {balances} ORDER BY 1"
    ))
    .fetch_all(pool)
    .await
    .map_err(|e| anyhow::anyhow!("{}: {e}", read("balances", &balances)))?;
    for (account, balance, transfers) in accounts {
        totals.detail(format!("balance of {account} (micros)"), balance);
        totals.detail(format!("transfers of {account}"), transfers);
    }
    for (day, currency, transfers, volume, largest) in days {
        totals.detail(format!("{day} {currency}: transfers"), transfers);
        totals.detail(format!("{day} {currency}: volume (micros)"), volume);
        totals.detail(
            format!("{day} {currency}: largest (micros)"),
            largest.unwrap_or(0),
        );
    }
    Ok(totals)
}
