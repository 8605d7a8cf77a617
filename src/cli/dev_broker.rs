//! `reproject dev-broker`: librdkafka's mock cluster as a process of its own.

use super::output::outln;
use clap::Args;

use super::{Cx, Outcome};
use crate::domain::Domain;
use crate::source::dev_broker::DevBroker;

#[derive(Args, Debug)]
pub struct DevBrokerArgs {
    /// Port to listen on for clients (forwarded to the mock broker)
    #[arg(long, default_value_t = 9092)]
    pub port: u16,
    /// Partitions of each topic to create (the mock cluster keeps at most 5 MiB per partition: about
    /// 100,000 compressed events of 50 bytes)
    #[arg(long, default_value_t = 16)]
    pub partitions: i32,
}

pub async fn run<D: Domain>(cx: &Cx<D>, args: DevBrokerArgs) -> anyhow::Result<Outcome> {
    let settings = cx.settings()?;
    let broker = DevBroker::start_with(&settings.topics, args.partitions)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on 127.0.0.1:{}: {e}", args.port))?;
    outln!(
        "dev broker ready: bootstrap 127.0.0.1:{} (mock cluster at {}), topics {} with {} partitions each. Ctrl-C stops it; its data lives in memory only.",
        args.port,
        broker.bootstrap_servers(),
        settings.topics.join(", "),
        args.partitions
    );
    tokio::select! {
        result = broker.forward(listener) => result.map_err(|e| anyhow::anyhow!("dev broker listener failed: {e}"))?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(Outcome::Success)
}
