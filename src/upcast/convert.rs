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
    let tz: Tz = zone
        .trim()
        .parse()
        .map_err(|_| format!("unknown time zone {zone:?}"))?;
    let naive = NaiveDateTime::parse_from_str(local.trim(), "%Y-%m-%d %H:%M:%S")
        .map_err(|e| e.to_string())?;
    let instant = tz
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| format!("does not exist in {zone} (a clock change skipped it)"))?;
    Ok(instant.timestamp_micros())
}
