//! Conversions real histories need when a message changes version, shared by upcasters written in
//! code (a domain's crate) and upcasters declared in files (`cents()` and `utc()` in their
//! expressions). Each returns what is wrong as a reason; the caller names the field or expression.

use chrono::{NaiveDateTime, TimeZone};
use chrono_tz::Tz;

/// "12.50" -> 1250: a decimal amount with at most two decimals, as integer cents, exactly (no float
/// anywhere). "12.5" and "7" are fine; "12,50", "1e3", "12.", ".5" and "12.505" are refused.
pub fn decimal_cents(text: &str) -> Result<i64, String> {
    let bad = || "is not a decimal amount like \"12.50\"".to_string();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let digits_only = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || !digits_only(whole)
        || fraction.len() > 2
        || !digits_only(fraction)
        || (digits.contains('.') && fraction.is_empty())
    {
        return Err(bad());
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let fraction: i64 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<i64>().map_err(|_| bad())? * 10,
        _ => fraction.parse().map_err(|_| bad())?,
    };
    let cents = whole
        .checked_mul(100)
        .and_then(|c| c.checked_add(fraction))
        .ok_or_else(bad)?;
    Ok(if negative { -cents } else { cents })
}

/// "2024-03-31 09:00:00 Europe/Berlin" apart into the local time and the zone name.
pub fn split_zoned(text: &str) -> Result<(&str, &str), String> {
    text.trim()
        .rsplit_once(' ')
        .ok_or_else(|| "is not \"YYYY-MM-DD HH:MM:SS Zone/Name\"".to_string())
}

/// A local time ("YYYY-MM-DD HH:MM:SS") in an IANA zone, as microseconds since the Unix epoch, UTC.
/// A local time a clock change repeated is its earlier instant; one it skipped is refused.
pub fn local_time_micros(local: &str, zone: &str) -> Result<i64, String> {
    let tz = zone_named(zone.trim()).ok_or_else(|| format!("unknown time zone {zone:?}"))?;
    let local = local.trim();
    let naive = match fixed_width_local_time(local) {
        Some(naive) => naive,
        None => {
            NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S").map_err(|e| e.to_string())?
        }
    };
    let instant = tz
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| format!("does not exist in {zone} (a clock change skipped it)"))?;
    Ok(instant.timestamp_micros())
}

/// The zone of that name. A history's events name a handful of zones: those met are kept per
/// thread (up to 16, by name), since looking a name up among chrono-tz's ~600 cost as much as the
/// rest of the conversion.
fn zone_named(name: &str) -> Option<Tz> {
    const KEPT: usize = 16;
    thread_local! {
        static MET: std::cell::RefCell<Vec<(String, Tz)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    MET.with(|met| {
        let mut met = met.borrow_mut();
        if let Some((_, tz)) = met.iter().find(|(kept, _)| kept == name) {
            return Some(*tz);
        }
        let tz: Tz = name.parse().ok()?;
        if met.len() < KEPT {
            met.push((name.to_string(), tz));
        }
        Some(tz)
    })
}

/// "YYYY-MM-DD HH:MM:SS" with every field at full width, read without chrono's format parser (the
/// upcaster's largest cost, per v1 event); anything else (other widths, a leap second, a date that
/// does not exist) is None and goes through chrono, which also words the error.
fn fixed_width_local_time(text: &str) -> Option<NaiveDateTime> {
    let b = text.as_bytes();
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(number(0..4)?).ok()?,
        number(5..7)?,
        number(8..10)?,
    )?;
    date.and_hms_opt(number(11..13)?, number(14..16)?, number(17..19)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn by_chrono(local: &str, zone: &str) -> Result<i64, String> {
        let tz: Tz = zone.parse().map_err(|_| "zone".to_string())?;
        let naive = NaiveDateTime::parse_from_str(local.trim(), "%Y-%m-%d %H:%M:%S")
            .map_err(|e| e.to_string())?;
        tz.from_local_datetime(&naive)
            .earliest()
            .map(|t| t.timestamp_micros())
            .ok_or_else(|| "skipped".to_string())
    }

    proptest! {
        /// The fixed-width reading gives what chrono's parser gives, for valid and invalid dates
        /// and times alike, in whichever zone came before.
        #[test]
        fn fixed_width_local_times_read_as_chrono_reads_them(
            year in 1900u32..2100, month in 0u32..14, day in 0u32..33,
            hour in 0u32..25, minute in 0u32..61, second in 0u32..62,
            zone in prop::sample::select(vec!["Europe/Berlin", "America/New_York", "UTC", "Asia/Kolkata"]),
        ) {
            let local = format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}");
            let fast = local_time_micros(&local, zone);
            let slow = by_chrono(&local, zone);
            prop_assert_eq!(fast.is_ok(), slow.is_ok(), "{} in {}: {:?} against {:?}", local, zone, fast, slow);
            if let (Ok(fast), Ok(slow)) = (fast, slow) {
                prop_assert_eq!(fast, slow);
            }
        }
    }

    #[test]
    fn other_shapes_still_go_through_chrono_and_its_errors() {
        assert_eq!(
            local_time_micros("2024-3-31 9:00:00", "UTC"),
            by_chrono("2024-3-31 9:00:00", "UTC")
        );
        assert!(local_time_micros("2024-02-30 09:00:00", "UTC").is_err());
        assert!(local_time_micros("2024-03-31 09:00:00", "Mars/Olympus").is_err());
        // Skipped by the clock change in Berlin.
        assert!(local_time_micros("2024-03-31 02:30:00", "Europe/Berlin")
            .unwrap_err()
            .contains("skipped"));
    }
}
