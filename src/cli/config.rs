//! The checked configuration: flags win over the environment, the environment over the config file,
//! the file over defaults.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde::Deserialize;

use super::GlobalArgs;
use crate::source::{check_topic_name, parse_property, KafkaSettings, Topics};

pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `reproject.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Kafka bootstrap servers.
    pub brokers: Option<String>,
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// A replica for verification and other heavy reads.
    pub read_database_url: Option<String>,
    /// The topic holding the event log (or `topics`, when it is several).
    pub topic: Option<String>,
    /// The topics holding the event log.
    pub topics: Option<Vec<String>>,
    /// Schema of the stable views.
    pub view_schema: Option<String>,
    /// librdkafka settings, e.g. `"security.protocol" = "SASL_SSL"`.
    #[serde(default)]
    pub kafka: std::collections::BTreeMap<String, String>,
    /// How records carry events, when not as the domain says (see `envelope::framing`).
    pub framing: Option<crate::envelope::FramingConfig>,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub database_url: String,
    pub read_database_url: Option<String>,
    /// The topics to read, in the order given (an example history's records name them by index).
    pub topics: Vec<String>,
    pub view_schema: String,
    pub schema_dir: Option<PathBuf>,
    pub quiet: bool,
    /// The config file's framing, checked; None: the domain's.
    pub framing: Option<crate::envelope::Framing>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Settings {
    pub fn resolve(global: &GlobalArgs, default_topics: &[&str]) -> anyhow::Result<Settings> {
        let explicit = global
            .config
            .clone()
            .or_else(|| env("REPROJECT_CONFIG").map(PathBuf::from));
        let file = match &explicit {
            Some(path) => read_config(path)?,
            None if std::path::Path::new("reproject.toml").exists() => {
                read_config(std::path::Path::new("reproject.toml"))?
            }
            None => FileConfig::default(),
        };
        let brokers = global
            .brokers
            .clone()
            .or_else(|| env("REPROJECT_BROKERS"))
            .or(file.brokers)
            .unwrap_or_else(|| DEFAULT_BROKERS.into());
        let database_url = global
            .database_url
            .clone()
            .or_else(|| env("DATABASE_URL"))
            .or(file.database_url)
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        check_database_url(&database_url)?;
        let read_database_url = global
            .read_database
            .clone()
            .or_else(|| env("REPROJECT_READ_DATABASE_URL"))
            .or(file.read_database_url);
        if let Some(url) = &read_database_url {
            check_database_url(url)?;
        }
        if file.topic.is_some() && file.topics.is_some() {
            bail!("the config file names both `topic` and `topics`: keep one");
        }
        let topics: Vec<String> = if !global.topic.is_empty() {
            global.topic.clone()
        } else if let Some(listed) = env("REPROJECT_TOPIC") {
            listed.split(',').map(|t| t.trim().to_string()).collect()
        } else if let Some(topics) = file.topics.or(file.topic.map(|t| vec![t])) {
            topics
        } else {
            default_topics.iter().map(|t| t.to_string()).collect()
        };
        for topic in &topics {
            check_topic_name(topic)?;
        }
        if topics.is_empty() {
            bail!("no topic to read: name one with --topic, REPROJECT_TOPIC or `topics` in the config file");
        }
        let framing = match &file.framing {
            Some(config) => Some(
                config
                    .framing()
                    .map_err(|e| anyhow::anyhow!("config file: {e}"))?,
            ),
            None => None,
        };
        let mut properties: Vec<(String, String)> = file.kafka.into_iter().collect();
        for p in &global.kafka_property {
            properties.push(parse_property(p)?);
        }
        Ok(Settings {
            kafka: KafkaSettings {
                brokers,
                properties,
            },
            database_url,
            read_database_url,
            topics,
            view_schema: global
                .view_schema
                .clone()
                .or(file.view_schema)
                .unwrap_or_else(|| "public".into()),
            schema_dir: global.schema_dir.clone(),
            quiet: global.quiet,
            framing,
        })
    }
}

impl Settings {
    /// The topics to read, as the engine takes them (sorted, checked).
    pub fn topics(&self) -> anyhow::Result<Topics> {
        Ok(Topics::new(self.topics.iter().cloned())?)
    }
}

fn read_config(path: &std::path::Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// A URL PostgreSQL will accept, checked before anything connects so the error names the URL.
fn check_database_url(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("DATABASE_URL {} is malformed: {e}", redact_url(url)))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        bail!(
            "DATABASE_URL {} must start with postgres:// or postgresql://",
            redact_url(url)
        );
    }
    Ok(())
}

/// The URL with its password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("REDACTED"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => match url.split_once('@') {
            Some((_, host)) => format!("<unparseable>@{host}"),
            None => "<unparseable url>".to_string(),
        },
    }
}

/// A size in bytes as people write it: `1048576`, `512k`, `256MiB`, `1.5G`, `2GB`. The suffixes are
/// powers of 1024 whether or not they say "i": a budget is about RAM.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 512MiB, 2GB, 1048576)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0_f64.powi(4),
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > usize::MAX as f64 {
        return Err(format!("{text:?} is not a usable size"));
    }
    Ok(bytes as usize)
}

/// [`parse_size`], where `0` means none.
pub fn parse_size_or_zero(text: &str) -> Result<usize, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_size(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_nonsense_is_refused() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("2 GB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn a_size_as_reproject_prints_it_reads_back_as_the_same_budget() {
        use crate::engine::memory::size_text;
        assert_eq!(size_text(300 << 10), "300 KiB");
        assert_eq!(size_text(147 << 20), "147 MiB");
        assert_eq!(size_text(12 << 30), "12.0 GiB");
        // An estimate's fold of the 10M-event example log, and a peak RSS.
        for bytes in [
            300u64 << 10,
            147 << 20,
            1_142_113_512,
            2_342_682_624,
            12 << 30,
        ] {
            let printed = size_text(bytes);
            let read = parse_size(&printed).expect("a printed size parses") as f64;
            let off = (read - bytes as f64).abs() / bytes as f64;
            assert!(
                off < 0.005,
                "{bytes} printed as {printed} reads back as {read}"
            );
        }
    }

    #[test]
    fn topics_come_from_flags_then_the_config_file_then_the_domain_in_the_order_given() {
        let defaults = ["ledger.accounts", "ledger.transfers"];
        let from_domain = Settings::resolve(&GlobalArgs::default(), &defaults).expect("defaults");
        assert_eq!(from_domain.topics, defaults);

        let dir = std::env::temp_dir().join(format!("rp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let file = dir.join("reproject.toml");
        std::fs::write(&file, "topics = [\"b.events\", \"a.events\"]\n").expect("write");
        let with_file = GlobalArgs {
            config: Some(file.clone()),
            ..GlobalArgs::default()
        };
        let settings = Settings::resolve(&with_file, &defaults).expect("the file's topics");
        assert_eq!(settings.topics, ["b.events", "a.events"], "the order given");
        let topics = settings.topics().expect("valid");
        assert_eq!(
            topics.names(),
            ["a.events", "b.events"],
            "the engine's: sorted"
        );

        let flagged = GlobalArgs {
            topic: vec!["c.events".into()],
            ..with_file
        };
        let settings = Settings::resolve(&flagged, &defaults).expect("the flag's topic");
        assert_eq!(settings.topics, ["c.events"], "a flag wins over the file");

        std::fs::write(&file, "topic = \"a\"\ntopics = [\"b\"]\n").expect("write");
        let both = Settings::resolve(&flagged_without_topic(&file), &defaults)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(both.contains("both `topic` and `topics`"), "{both}");
        std::fs::write(&file, "topics = [\"not valid!\"]\n").expect("write");
        let invalid = Settings::resolve(&flagged_without_topic(&file), &defaults)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            invalid.contains("\"not valid!\" is not a valid Kafka topic name"),
            "{invalid}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn flagged_without_topic(file: &std::path::Path) -> GlobalArgs {
        GlobalArgs {
            config: Some(file.to_path_buf()),
            ..GlobalArgs::default()
        }
    }

    #[test]
    fn passwords_never_appear_in_printed_urls() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:REDACTED@db:5432/x"
        );
        assert!(!redact_url("postgres://app:s3cret@db:5432/x?sslmode=require").contains("s3cret"));
        assert!(!redact_url("not a url:s3cret@db").contains("s3cret"));
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
    }

    #[test]
    fn malformed_database_urls_are_refused_with_the_password_hidden() {
        let err = check_database_url("mysql://u:pw@h/db").expect_err("scheme");
        assert!(
            err.to_string().contains("postgres://") && !err.to_string().contains("pw@"),
            "{err}"
        );
        assert!(check_database_url("::::").is_err());
        assert!(check_database_url("postgres://postgres@127.0.0.1:5432/postgres").is_ok());
    }
}
