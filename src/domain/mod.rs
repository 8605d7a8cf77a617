//! What a team brings to reproject: a [`Domain`] gathers its event type, upcasters, projections, the
//! SQL of each projection version, its Protobuf descriptors and its default topics. The engine and the
//! command line take any domain (`reproject::cli::main(MyDomain)`); nothing else in the crate knows
//! which events it is replaying.
//!
//! A domain may also bring an [`Example`]: a deterministic history generator whose totals are computed
//! without the upcasters or projections, so that `seed`, `demo`, `bench` and `check-totals` can show the
//! views agree with an independent computation.
//!
//! `shop` is the example domain the stock binary runs. It uses only the public API, through
//! `reproject::` paths, exactly as a crate of its own would.

pub mod files;
pub mod shop;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::projection::{DynProjection, SchemaSql};
use crate::upcast::{Registry, RegistryError};

/// A future a trait method returns, boxed so that [`Example`] stays object safe (the same as
/// `futures::future::BoxFuture`, without making a domain's crate depend on `futures`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A team's events and views. Implement it in your own crate and hand it to
/// [`crate::cli::main`]; see the README, "Use it with your own events".
pub trait Domain: Send + Sync + 'static {
    /// The latest version of every event, as projections see it (usually an enum over the latest
    /// generated Protobuf messages).
    type Event: Send + Sync + 'static;

    /// A short name for `--help`, logs and the demo, e.g. "shop".
    fn name(&self) -> &str;

    /// The topics read when neither `--topic`, `REPROJECT_TOPIC` nor the config file names them.
    /// One topic per aggregate type is common; every projection sees the events of all of them,
    /// and rows fed by several topics resolve by logical time like rows fed by several partitions.
    fn default_topics(&self) -> &[&str];

    /// Every message version and the steps between them; checked once at start-up.
    fn registry(&self) -> Result<Registry<Self::Event>, RegistryError>;

    /// Every projection, at its current code version.
    fn projections(&self) -> Vec<DynProjection<Self::Event>>;

    /// The SQL of a projection version (its tables, then its indexes), when compiled in. `--schema-dir`
    /// reads it from files laid out as `<projection>/v<N>/{tables,indexes}.sql` instead.
    fn schema(&self, projection: &str, version: u32) -> Option<SchemaSql>;

    /// An encoded `google.protobuf.FileDescriptorSet` of every payload message, for `replay`'s JSON.
    /// prost-build with protox gives it at build time (see the shop's or the ledger's `build.rs`).
    fn descriptors(&self) -> &[u8];

    /// How its records carry events (reproject's envelope by default; CloudEvents' binary mode or
    /// Confluent's wire format otherwise). The config file's `[framing]` table overrides it.
    fn framing(&self) -> crate::envelope::Framing {
        crate::envelope::Framing::Envelope
    }

    /// A history generator with independently computed totals, when the domain has one.
    fn example(&self) -> Option<&dyn Example> {
        None
    }

    /// Where each projection version was declared and the hash of that declaration, for a domain
    /// read from files. Each build records its version's hash; a declaration changed under the same
    /// version is refused (see [`crate::engine::Engine::refuse_edited_definitions`]). Compiled
    /// domains have none: their versions are code, released as a whole.
    fn definitions(&self) -> Vec<Definition> {
        Vec::new()
    }

    /// The domain read again, when what it was read from has changed since (a domain defined by
    /// files): `run` asks every few seconds and picks up a new view file or version without a
    /// restart. `None` when nothing changed or the domain is compiled; `Some(Err)` describes every
    /// problem of the changed files.
    fn reload(&self) -> Option<Result<Self, String>>
    where
        Self: Sized,
    {
        None
    }
}

/// The declaration of one projection version: which file, and a hash of what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Definition {
    pub projection: String,
    pub version: u32,
    /// The file, as users name it (`views/order_summary/v1.toml`).
    pub source: String,
    /// SHA-256 of the parsed declaration, hex: comments and layout do not change it.
    pub hash: String,
    /// SHA-256 of what every view of the domain reads events through, hex: the schemas (without
    /// their comments), the event types and the upcaster steps. Editing them is allowed (fixing an
    /// upcaster is a reason to rebuild), but builds made before no longer show what the files say.
    pub inputs_hash: String,
}

/// A deterministic example history and the totals its views must show.
pub trait Example: Send + Sync {
    /// Knobs of the history's shape besides its length and seed, as `seed --shape KEY=N` takes them:
    /// `(key, what it means)`.
    fn shape_keys(&self) -> &[(&'static str, &'static str)] {
        &[]
    }

    /// The history: an endless stream of records in log order. `size.events` is the length it is
    /// shaped for; the same size gives the same records, byte for byte.
    fn history(&self, size: &HistorySize) -> Box<dyn History>;

    /// The same figures as [`History::expected`], read back from the live views in `view_schema`.
    fn actual_totals<'a>(
        &'a self,
        pool: &'a sqlx::PgPool,
        view_schema: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Totals>>;
}

/// How big an example history is and how it is drawn.
#[derive(Clone, Debug)]
pub struct HistorySize {
    /// The history length the stream is shaped for (an append continues a stream shaped for the
    /// earlier seed's length).
    pub events: u64,
    /// Random seed: the same size and seed give the same log.
    pub seed: u64,
    /// Domain-specific knobs (see [`Example::shape_keys`]); absent keys take the example's defaults.
    pub shape: BTreeMap<String, u64>,
}

impl HistorySize {
    pub fn new(events: u64, seed: u64) -> HistorySize {
        HistorySize {
            events,
            seed,
            shape: BTreeMap::new(),
        }
    }
}

/// An example history: records in log order, and what the views must show after those emitted so far.
pub trait History: Iterator<Item = Record> + Send {
    fn expected(&self) -> Totals;
}

/// One record of an example history.
#[derive(Clone, Debug)]
pub struct Record {
    /// Which of [`Domain::default_topics`] it goes to, by index (the topics a user names instead
    /// take their place in the same order).
    pub topic: usize,
    /// The record key (the aggregate id: Kafka keeps one key's records in one partition).
    pub key: String,
    /// The encoded record value.
    pub value: Vec<u8>,
    /// Record headers (where a CloudEvents-framed domain keeps the event's type, id and time);
    /// empty for the envelope framing.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Unix seconds of the event, as its envelope says.
    pub occurred_at: i64,
}

/// Figures a domain's views must show, as the example's generator computes them and as they are read
/// back from the views. `check-totals` and the demo compare them by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Events the figures cover.
    pub events: u64,
    /// Events per message version (e.g. "v1"), for the seed's report.
    #[serde(default)]
    pub events_by_version: BTreeMap<String, u64>,
    /// Named figures in the order they are printed.
    pub figures: Vec<Figure>,
}

/// One named figure. Detail figures (one per day, say) are compared but not printed one by one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figure {
    pub name: String,
    pub value: i64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detail: bool,
}

/// How many differing detail figures are listed before the rest are only counted.
const DETAIL_DIFFERENCES_SHOWN: usize = 10;

impl Totals {
    /// Adds a printed figure.
    pub fn figure(&mut self, name: impl Into<String>, value: i64) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            detail: false,
        });
    }

    /// Adds a figure that is compared but not printed on its own line.
    pub fn detail(&mut self, name: impl Into<String>, value: i64) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            detail: true,
        });
    }

    /// The value of a figure; a figure one side lacks counts as 0 (no rows, no sum).
    pub fn get(&self, name: &str) -> i64 {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map_or(0, |f| f.value)
    }

    /// Every figure that differs from `actual`, as readable lines; empty when they agree.
    pub fn differences(&self, actual: &Totals) -> Vec<String> {
        let values = |t: &Totals| -> BTreeMap<String, (i64, bool)> {
            t.figures
                .iter()
                .map(|f| (f.name.clone(), (f.value, f.detail)))
                .collect()
        };
        let (expected, found) = (values(self), values(actual));
        let mut names: Vec<&String> = self.figures.iter().map(|f| &f.name).collect();
        names.extend(
            actual
                .figures
                .iter()
                .map(|f| &f.name)
                .filter(|n| !expected.contains_key(*n)),
        );
        let mut out = Vec::new();
        let mut details = 0;
        for name in names {
            let (e, e_detail) = expected.get(name).copied().unwrap_or((0, true));
            let (a, a_detail) = found.get(name).copied().unwrap_or((0, true));
            if e == a {
                continue;
            }
            if e_detail && a_detail {
                details += 1;
                if details > DETAIL_DIFFERENCES_SHOWN {
                    continue;
                }
            }
            out.push(format!("{name}: expected {e}, found {a}"));
        }
        if details > DETAIL_DIFFERENCES_SHOWN {
            out.push(format!(
                "... and {} more detail figures differ",
                details - DETAIL_DIFFERENCES_SHOWN
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.rs` file under `dir`, with its text.
    fn sources(dir: &std::path::Path) -> Vec<(std::path::PathBuf, String)> {
        let mut out = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).expect("source folder") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).expect("source file");
                    out.push((path, text));
                }
            }
        }
        out
    }

    #[test]
    fn the_shop_uses_only_the_public_api_and_nothing_else_names_it() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let shop = src.join("domain").join("shop");
        for (path, text) in sources(&src) {
            if path.starts_with(&shop) {
                // `crate::` would reach items a team's crate cannot; `reproject::` is the public API.
                assert!(
                    !text.contains("crate::") && !text.contains("pub(crate)"),
                    "{} reaches into the crate's private items",
                    path.display()
                );
            } else if ![
                src.join("main.rs"),
                src.join("lib.rs"),
                src.join("domain").join("mod.rs"),
            ]
            .contains(&path)
            {
                let lowered = text.to_lowercase();
                assert!(
                    !lowered.contains("shop"),
                    "{} names the example shop; the engine and the command line must work for any domain",
                    path.display()
                );
            }
        }
    }

    fn totals(figures: &[(&str, i64, bool)]) -> Totals {
        let mut t = Totals::default();
        for &(name, value, detail) in figures {
            if detail {
                t.detail(name, value);
            } else {
                t.figure(name, value);
            }
        }
        t
    }

    #[test]
    fn totals_agree_when_every_figure_matches_and_a_missing_figure_counts_as_zero() {
        let expected = totals(&[("orders", 3, false), ("refunds", 0, false)]);
        let actual = totals(&[("orders", 3, false)]);
        assert!(expected.differences(&actual).is_empty());
    }

    #[test]
    fn differences_name_the_figure_and_both_values_and_count_detail_beyond_ten() {
        let expected = totals(
            &[("orders", 3, false)]
                .into_iter()
                .chain((0..15).map(|_| ("day", 1, true)))
                .collect::<Vec<_>>(),
        );
        let mut expected = expected;
        for (i, f) in expected.figures.iter_mut().skip(1).enumerate() {
            f.name = format!("day {i}");
        }
        let mut actual = expected.clone();
        actual.figures[0].value = 4;
        for f in actual.figures.iter_mut().skip(1) {
            f.value = 2;
        }
        actual.detail("only in the views", 7);
        let diffs = expected.differences(&actual);
        assert_eq!(diffs[0], "orders: expected 3, found 4");
        assert_eq!(diffs.len(), 1 + DETAIL_DIFFERENCES_SHOWN + 1, "{diffs:#?}");
        assert_eq!(
            diffs.last().map(String::as_str),
            Some("... and 6 more detail figures differ")
        );
    }
}
