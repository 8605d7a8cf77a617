//! Verifying a build before it goes live: pick what to compare it with (the live build, a version,
//! a build), line the two up at the same log position, compare them (`verify::compare`, on the read
//! database when one is given), add the source-side checks the replay recorded, and give a verdict
//! against the thresholds. Every verification is kept in `reproject.verifications`.
//!
//! Lining up: the build that is behind is caught up to exactly the other's positions, when this
//! binary has its code and no other process is writing it. A live build that another process keeps
//! moving is chased a few rounds; if the positions never meet, the report says by how much they
//! differ and `strict` refuses.

use std::time::Duration;

use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use super::follow::{self, FollowTarget, Until};
use super::{Engine, EngineError, Result};
use crate::projection::DynProjection;
use crate::sink::catalog::{self, Positions};
use crate::sink::lock::LockError;
use crate::sink::{Build, Context, Phase};
use crate::verify::{self, BucketBy, CompareRequest, Comparison};

/// What to compare a build with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Against {
    /// The live build of the projection.
    Active,
    /// The newest build of this version other than the candidate.
    Version(u32),
    Build(i64),
}

/// `strict` refuses a swap that fails verification; `report` swaps anyway and keeps the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    Strict,
    Report,
}

impl VerifyMode {
    /// As kept in `reproject.verifications.mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Strict => "strict",
            VerifyMode::Report => "report",
        }
    }
}

#[derive(Clone, Debug)]
pub struct VerifyPolicy {
    pub mode: VerifyMode,
    /// Rows allowed to differ (on one side only or with other values), over all tables.
    pub max_rows_differing: i64,
    pub bucket_by: BucketBy,
    pub sample_keys: usize,
    /// The sample's seed; None: a fresh one (shown in the report, so a run can be repeated).
    pub seed: Option<i64>,
    /// Offsets the replay did not receive (transaction markers, compaction) are expected on this
    /// topic: do not count them as a failure.
    pub allow_offset_gaps: bool,
}

impl Default for VerifyPolicy {
    fn default() -> Self {
        VerifyPolicy {
            mode: VerifyMode::Report,
            max_rows_differing: 0,
            bucket_by: BucketBy::Day,
            sample_keys: 1_000,
            seed: None,
            allow_offset_gaps: false,
        }
    }
}

/// A verification's outcome: the comparison, the source checks, and why it fails if it does.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Verification {
    pub projection: String,
    pub candidate_build_id: i64,
    pub baseline_build_id: Option<i64>,
    pub comparison: Option<Comparison>,
    /// What the replay saw per partition and per aggregate (see `reader::SourceChecks`).
    pub source: Option<serde_json::Value>,
    pub notes: Vec<String>,
    pub passed: bool,
    /// Why it did not pass: each one a sentence.
    pub failures: Vec<String>,
    pub verification_id: Option<i64>,
}

impl Verification {
    pub fn render(&self) -> String {
        let mut s = match &self.comparison {
            Some(c) => c.render(),
            None => format!(
                "{}: build {} has nothing to compare with\n",
                self.projection, self.candidate_build_id
            ),
        };
        if let Some(source) = &self.source {
            s.push_str(&render_source(source));
        } else {
            s.push_str("\n  source checks: none recorded for this build (built before they existed, or resumed after its replay)\n");
        }
        for note in &self.notes {
            s.push_str(&format!("  note: {note}\n"));
        }
        if self.passed {
            s.push_str("\n  verdict: PASSED\n");
        } else {
            s.push_str("\n  verdict: FAILED\n");
            for f in &self.failures {
                s.push_str(&format!("    - {f}\n"));
            }
        }
        if let Some(id) = self.verification_id {
            s.push_str(&format!("  (kept as verification {id})\n"));
        }
        s
    }
}

fn render_source(source: &serde_json::Value) -> String {
    let get = |k: &str| source.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
    let mut s = format!(
        "\n  source checks (replay): {} partitions, {} records received for {} offsets, {} offsets not received",
        get("partitions"),
        get("records"),
        get("offsets"),
        get("offsets_skipped"),
    );
    match source.get("aggregates").and_then(|v| v.as_i64()) {
        Some(n) => s.push_str(&format!(
            "; {n} aggregates' sequence numbers checked: {} gaps, {} repeats\n",
            get("sequence_gaps"),
            get("sequence_repeats")
        )),
        None => s.push_str(
            "; aggregate sequences not checked (the aggregate index outgrew its memory share)\n",
        ),
    }
    if let Some(examples) = source.get("gap_examples").and_then(|v| v.as_array()) {
        for e in examples {
            s.push_str(&format!("    gap: {}\n", e.as_str().unwrap_or_default()));
        }
    }
    s
}

/// Compare `candidate` with what `against` names, after lining them up, and record the result.
pub async fn verify<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projection: &DynProjection<E>,
    candidate: &Build,
    against: Against,
    policy: &VerifyPolicy,
    cancel: &CancellationToken,
) -> Result<Verification> {
    let baseline = baseline(engine, projection.name(), candidate, against).await?;
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    let comparison = match &baseline {
        None => {
            notes.push(format!(
                "no other build of {} to compare with ({})",
                projection.name(),
                match against {
                    Against::Active => "none is live yet".to_string(),
                    Against::Version(v) => format!("no other build of version {v}"),
                    Against::Build(b) => format!("build {b} not found"),
                }
            ));
            None
        }
        Some(baseline) => {
            line_up(engine, projection, candidate, baseline, cancel, &mut notes).await?;
            let seed = policy
                .seed
                .unwrap_or_else(|| rand::random::<i32>().unsigned_abs() as i64);
            let url = engine
                .read_database_url
                .as_deref()
                .unwrap_or(&engine.database_url);
            let mut conn = sqlx::PgConnection::connect(url).await.context(|| {
                format!(
                    "verify {}: connecting to the read database",
                    projection.name()
                )
            })?;
            let comparison = verify::compare(
                &mut conn,
                &CompareRequest {
                    projection: projection.name(),
                    candidate,
                    baseline,
                    specs: projection.tables(),
                    bucket_by: policy.bucket_by,
                    sample_keys: policy.sample_keys,
                    seed,
                },
            )
            .await?;
            if !comparison.same_position {
                failures.push(format!(
                    "builds {} and {} are not at the same log position ({} offsets apart), so their rows cannot be compared exactly",
                    candidate.build_id,
                    baseline.build_id,
                    comparison.position_gap()
                ));
            }
            let differing = comparison.rows_differing();
            if differing > policy.max_rows_differing {
                let tables: Vec<String> = comparison
                    .tables
                    .iter()
                    .filter(|t| t.rows_differing() > 0)
                    .map(|t| format!("{}: {}", t.table, t.rows_differing()))
                    .collect();
                failures.push(format!(
                    "{differing} rows differ ({}), more than the {} allowed",
                    tables.join(", "),
                    policy.max_rows_differing
                ));
            }
            Some(comparison)
        }
    };
    let source = engine.catalog.source_checks(candidate.build_id).await?;
    if let Some(source) = &source {
        let skipped = source
            .get("offsets_skipped")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        if skipped > 0 && !policy.allow_offset_gaps {
            failures.push(format!(
                "the replay did not receive {skipped} offsets of the ranges it read (see the source checks); \
                 on a topic with transactions or compaction that is expected: pass --allow-offset-gaps"
            ));
        }
        let gaps = source
            .get("sequence_gaps")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        if gaps > 0 {
            failures.push(format!(
                "{gaps} gaps in aggregates' sequence numbers: events are missing from the log (examples in the source checks)"
            ));
        }
    }
    let mut verification = Verification {
        projection: projection.name().to_string(),
        candidate_build_id: candidate.build_id,
        baseline_build_id: baseline.as_ref().map(|b| b.build_id),
        comparison,
        source,
        notes,
        passed: failures.is_empty(),
        failures,
        verification_id: None,
    };
    let report = serde_json::to_value(&verification).map_err(|e| {
        crate::sink::SinkError::Invalid(format!("encoding a verification report: {e}"))
    })?;
    let id = engine
        .catalog
        .record_verification(&crate::sink::catalog::NewVerification {
            projection: &verification.projection,
            candidate_build_id: verification.candidate_build_id,
            baseline_build_id: verification.baseline_build_id,
            mode: policy.mode.as_str(),
            passed: verification.passed,
            rows_differing: verification.comparison.as_ref().map(|c| c.rows_differing()),
            report,
        })
        .await?;
    verification.verification_id = Some(id);
    Ok(verification)
}

async fn baseline<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projection: &str,
    candidate: &Build,
    against: Against,
) -> Result<Option<Build>> {
    let builds = engine.catalog.builds(Some(projection)).await?;
    let with_tables = |b: &Build| {
        b.build_id != candidate.build_id
            && !matches!(b.phase, Phase::Dropped | Phase::Failed | Phase::Loading)
    };
    Ok(match against {
        Against::Active => builds
            .into_iter()
            .find(|b| b.phase == Phase::Active && b.build_id != candidate.build_id),
        Against::Version(v) => builds
            .into_iter()
            .filter(|b| b.version == v && with_tables(b))
            .max_by_key(|b| b.build_id),
        Against::Build(id) => builds
            .into_iter()
            .find(|b| b.build_id == id && with_tables(b)),
    })
}

const LINE_UP_ROUNDS: usize = 5;

/// Catch whichever build is behind up to exactly the other's positions, a few rounds, since a
/// follower elsewhere may move the live one meanwhile.
async fn line_up<E: Send + Sync + 'static>(
    engine: &Engine<E>,
    projection: &DynProjection<E>,
    candidate: &Build,
    baseline: &Build,
    cancel: &CancellationToken,
    notes: &mut Vec<String>,
) -> Result<()> {
    for _ in 0..LINE_UP_ROUNDS {
        let a = engine.catalog.positions(candidate.build_id).await?;
        let b = engine.catalog.positions(baseline.build_id).await?;
        if a == b {
            return Ok(());
        }
        let mut target: Positions = a.clone();
        catalog::raise_positions(&mut target, &b);
        let mut moved = false;
        for (build, at) in [(candidate, &a), (baseline, &b)] {
            if *at == target {
                continue;
            }
            if build.version != projection.version() {
                let note = format!(
                    "build {} is version {} and this binary has version {}'s code, so it cannot be caught up here",
                    build.build_id,
                    build.version,
                    projection.version()
                );
                if !notes.contains(&note) {
                    notes.push(note);
                }
                continue;
            }
            let target_build = FollowTarget {
                build: build.clone(),
                projection: projection.clone(),
                positions: at.clone(),
            };
            match follow::follow(
                engine,
                vec![target_build],
                Until::Reached(target.clone()),
                cancel,
                "lining up to verify",
            )
            .await
            {
                Ok(_) => moved = true,
                Err(EngineError::Lock(LockError::Held { holder, .. })) => {
                    // Someone else moves it: look again shortly.
                    let note = format!("build {} is being written by {holder}", build.build_id);
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                    moved = true;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
            if cancel.is_cancelled() {
                return Err(EngineError::Interrupted);
            }
        }
        if !moved {
            return Ok(());
        }
    }
    Ok(())
}
