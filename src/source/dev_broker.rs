//! A development broker: librdkafka's in-process mock cluster, kept alive as a process of its own so
//! that separate commands (`seed`, `rebuild`, `run`, `status`) can share it.
//!
//! The mock cluster listens on a port it picks. To give users a fixed address, the dev broker also
//! listens on `--port` and forwards each connection to the mock broker; clients bootstrap through
//! the fixed port and then talk to the address the broker advertises, both on loopback.
//!
//! The mock keeps at most 5 MiB of batches per partition (shared/LIMITS.md): use enough partitions and
//! compression for large histories. `rebuild` checks each partition's log start, so history the mock
//! dropped is noticed, not silently skipped.

use rdkafka::mocking::MockCluster;
use tokio::net::{TcpListener, TcpStream};

use super::SourceError;

/// A running mock cluster with its topics created.
pub struct DevBroker {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
}

impl DevBroker {
    pub fn start(topic: &str, partitions: i32) -> Result<DevBroker, SourceError> {
        Self::start_with(&[topic], partitions)
    }

    /// A mock cluster with each of `topics` created with `partitions` partitions.
    pub fn start_with<S: AsRef<str>>(
        topics: &[S],
        partitions: i32,
    ) -> Result<DevBroker, SourceError> {
        let cluster = MockCluster::new(1).map_err(|source| SourceError::Kafka {
            brokers: "mock cluster".into(),
            context: "starting the mock cluster".into(),
            source: Box::new(source),
        })?;
        let broker = DevBroker { cluster };
        for topic in topics {
            broker.create_topic(topic.as_ref(), partitions)?;
        }
        Ok(broker)
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    pub fn cluster(&self) -> &MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        &self.cluster
    }

    /// Create another topic on the running cluster.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), SourceError> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(|source| SourceError::Kafka {
                brokers: self.bootstrap_servers(),
                context: format!("creating topic {topic} with {partitions} partitions"),
                source: Box::new(source),
            })
    }

    /// Forward connections from `listener` to the mock broker until the task is dropped.
    pub async fn forward(&self, listener: TcpListener) -> std::io::Result<()> {
        let target = self.bootstrap_servers();
        loop {
            let (mut inbound, _) = listener.accept().await?;
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }
}

/// `dev-broker` run as a process of its own by a reproject binary (the stock one, or a team's), for
/// end-to-end tests of a domain's crate: separate commands then share it as they would share a real
/// broker. Killed when dropped.
pub struct DevBrokerProcess {
    child: std::process::Child,
    /// The fixed address clients bootstrap through.
    pub address: String,
}

impl DevBrokerProcess {
    /// Starts `program dev-broker` on a free port with `partitions` partitions of the program's
    /// default topic, and waits until it says it is ready.
    pub fn spawn(program: &str, partitions: u32) -> std::io::Result<DevBrokerProcess> {
        Self::spawn_with_topics(program, partitions, &[])
    }

    /// [`DevBrokerProcess::spawn`] with these topics instead of the program's default ones.
    pub fn spawn_with_topics(
        program: &str,
        partitions: u32,
        topics: &[String],
    ) -> std::io::Result<DevBrokerProcess> {
        use std::io::{BufRead, BufReader};
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = std::process::Command::new(program);
        command
            .args(["dev-broker", "--port", &port.to_string()])
            .args(["--partitions", &partitions.to_string(), "--quiet"]);
        if !topics.is_empty() {
            command.args(["--topic", &topics.join(",")]);
        }
        let mut child = command.stdout(std::process::Stdio::piped()).spawn()?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            BufReader::new(stdout).read_line(&mut line)?;
        }
        if !line.contains("dev broker ready") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "{program} dev-broker did not say it was ready; it said {line:?}"
            )));
        }
        Ok(DevBrokerProcess {
            child,
            address: format!("127.0.0.1:{port}"),
        })
    }
}

impl Drop for DevBrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
