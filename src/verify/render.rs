//! The verification report as people read it: what differs, how much, with examples.

use std::fmt::Write as _;

use super::Comparison;

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn shown(value: &Option<String>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "NULL".into(),
    }
}

impl Comparison {
    /// The report as people read it: what differs, how much, with examples.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let events: i64 = self.candidate.positions.values().sum();
        writeln!(
            s,
            "{}: build {} (v{}, {}) against build {} (v{}, {})",
            self.projection,
            self.candidate.build_id,
            self.candidate.version,
            self.candidate.phase,
            self.baseline.build_id,
            self.baseline.version,
            self.baseline.phase
        )
        .ok();
        if self.same_position {
            writeln!(
                s,
                "  both at the same log position ({} offsets read)",
                thousands(events)
            )
            .ok();
        } else {
            writeln!(
                s,
                "  NOT at the same log position: the builds differ by {} offsets; differences below may come from that",
                thousands(self.position_gap())
            )
            .ok();
        }
        for t in &self.tables {
            writeln!(s, "\n  table {}", t.table).ok();
            writeln!(
                s,
                "    rows                  {:>14} -> {:<14} ({:+})",
                thousands(t.rows_baseline),
                thousands(t.rows_candidate),
                t.rows_candidate - t.rows_baseline
            )
            .ok();
            if !t.columns_only_in_baseline.is_empty() || !t.columns_only_in_candidate.is_empty() {
                writeln!(
                    s,
                    "    columns not compared: only in the baseline [{}], only in the candidate [{}]",
                    t.columns_only_in_baseline.join(", "),
                    t.columns_only_in_candidate.join(", ")
                )
                .ok();
            }
            match &t.keys {
                None => {
                    writeln!(
                        s,
                        "    keys not compared: the key columns are not on both sides"
                    )
                    .ok();
                }
                Some(k) => {
                    for (what, n, examples) in [
                        (
                            "only in the baseline ",
                            k.only_in_baseline,
                            &k.examples_only_in_baseline,
                        ),
                        (
                            "only in the candidate",
                            k.only_in_candidate,
                            &k.examples_only_in_candidate,
                        ),
                    ] {
                        write!(s, "    rows {what} {:>11}", thousands(n)).ok();
                        if !examples.is_empty() {
                            write!(s, "   e.g. {}", examples.join(", ")).ok();
                        }
                        s.push('\n');
                    }
                    writeln!(
                        s,
                        "    rows with other values {:>10}",
                        thousands(k.rows_differing)
                    )
                    .ok();
                    for c in &k.columns {
                        write!(s, "      {:<22} {:>10} rows", c.column, thousands(c.rows)).ok();
                        if let Some(e) = c.examples.first() {
                            write!(
                                s,
                                "   e.g. {}: {} -> {}",
                                e.key,
                                shown(&e.baseline),
                                shown(&e.candidate)
                            )
                            .ok();
                        }
                        s.push('\n');
                    }
                    writeln!(
                        s,
                        "    sample of {} keys (seed {}): {} differ, {} on one side only",
                        k.sample.keys, self.seed, k.sample.differing, k.sample.only_one_side
                    )
                    .ok();
                }
            }
            let by = match &t.bucket_column {
                Some(c) => format!("by {c}"),
                None => "(no time column: one bucket)".into(),
            };
            writeln!(
                s,
                "    buckets {by}: {} compared, {} differ",
                t.buckets_compared, t.buckets_differing_count
            )
            .ok();
            for b in &t.buckets_differing {
                write!(
                    s,
                    "      {:<12} rows {} -> {}{}",
                    b.bucket,
                    thousands(b.rows_baseline),
                    thousands(b.rows_candidate),
                    if b.checksum_equal {
                        ""
                    } else {
                        ", checksum differs"
                    }
                )
                .ok();
                for (c, x, y) in &b.sums {
                    write!(s, ", sum({c}) {x} -> {y}").ok();
                }
                s.push('\n');
            }
            if t.buckets_differing_count > t.buckets_differing.len() {
                writeln!(
                    s,
                    "      ... and {} more",
                    t.buckets_differing_count - t.buckets_differing.len()
                )
                .ok();
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234), "1,234");
        assert_eq!(thousands(-1234567), "-1,234,567");
    }
}
