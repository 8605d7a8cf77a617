//! `reproject check`: what the domain defines, checked before anything runs and without a broker or
//! a database: its upcaster chains, its projections, their tables and their SQL. A domain defined by
//! files was already compiled to get here (`--domain DIR` reports every problem in the files, with
//! its file and line, before any command runs).

use clap::Args;

use super::output::outln;
use super::{Cx, Outcome};
use crate::domain::Domain;

#[derive(Args, Debug)]
pub struct CheckArgs {}

pub async fn run<D: Domain>(cx: &Cx<D>, _args: CheckArgs) -> anyhow::Result<Outcome> {
    let domain = &cx.domain;
    let registry = domain
        .registry()
        .map_err(|e| anyhow::anyhow!("domain {}: its upcasters: {e}", domain.name()))?;
    let chains = registry.chains();
    let latest = chains.values().filter(|chain| chain.len() == 1).count();
    outln!(
        "domain {}: {} message type(s), {} of them latest versions",
        domain.name(),
        chains.len(),
        latest
    );
    let schemas = {
        let domain = domain.clone();
        crate::engine::SchemaSource::new(cx.global.schema_dir.clone(), move |p, v| {
            domain.schema(p, v)
        })
    };
    let mut problems = Vec::new();
    for projection in domain.projections() {
        let name = projection.name();
        let version = projection.version();
        for spec in projection.tables() {
            if let Err(e) = spec.check() {
                problems.push(format!("projection {name} v{version}: {e}"));
            }
        }
        if let Err(e) = schemas.load(name, version) {
            problems.push(format!("projection {name} v{version}: {e}"));
        }
        let tables: Vec<String> = projection
            .tables()
            .iter()
            .map(|t| format!("{} ({} columns)", t.name, t.columns.len()))
            .collect();
        outln!("  {name} v{version}: {}", tables.join(", "));
    }
    if problems.is_empty() {
        outln!("ok");
        Ok(Outcome::Success)
    } else {
        for p in &problems {
            outln!("problem: {p}");
        }
        Ok(Outcome::Failed)
    }
}
