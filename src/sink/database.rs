//! Creating whole databases: for the demo and for tests, each of which gets a fresh one.

use sqlx::{Connection, PgConnection};

use super::{check_identifier, quote_ident, Context, Result, SinkError};

/// `url` pointing at database `name` instead.
pub fn with_database(url: &str, name: &str) -> Result<String> {
    let mut parsed = url::Url::parse(url)
        .map_err(|e| SinkError::Invalid(format!("database URL is malformed: {e}")))?;
    parsed.set_path(&format!("/{name}"));
    Ok(parsed.to_string())
}

/// Drop database `name` if it exists (disconnecting its clients) and create it empty. Returns its URL.
pub async fn recreate_database(url: &str, name: &str) -> Result<String> {
    check_identifier("database", name)?;
    let mut admin = PgConnection::connect(url)
        .await
        .context(|| "connecting to PostgreSQL".into())?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(name)
    ))
    .execute(&mut admin)
    .await
    .context(|| format!("dropping database {name}"))?;
    sqlx::query(&format!("CREATE DATABASE {}", quote_ident(name)))
        .execute(&mut admin)
        .await
        .context(|| format!("creating database {name}"))?;
    let _ = admin.close().await;
    with_database(url, name)
}
