//! Wall-clock time as the API carries it: JSON 1.1 timestamps are seconds since the epoch
//! (fractional); the CLI prints ISO 8601, as the aws CLI does.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Milliseconds to the wire's fractional seconds.
pub fn millis_to_wire(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// Seconds since the epoch as ISO 8601 in UTC with microseconds and offset, the aws CLI's
/// format (`2024-05-01T12:00:00.123000+00:00`).
pub fn iso8601(epoch_seconds: f64) -> String {
    let micros = (epoch_seconds * 1_000_000.0).round() as i64;
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}+00:00", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(iso8601(951_782_400.5), "2000-02-29T00:00:00.500000+00:00");
        assert_eq!(iso8601(1_700_000_000.123), "2023-11-14T22:13:20.123000+00:00");
    }
}
