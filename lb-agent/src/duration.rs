//! Durations as kube-proxy's flags and configuration file write them: Go's
//! syntax, a sequence of decimal numbers each with a unit (`90s`, `1.5h`,
//! `24h0m0s`, `500ms`; units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`). A bare
//! number is refused, except `0`.

use std::time::Duration;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?}: empty")]
    Empty(String),
    #[error("{0:?}: missing unit after {1} (ns, us, ms, s, m or h)")]
    MissingUnit(String, String),
    #[error("{0:?}: unknown unit {1:?} (ns, us, ms, s, m or h)")]
    UnknownUnit(String, String),
    #[error("{0:?}: expected a number before {1:?}")]
    NotANumber(String, String),
    #[error("{0:?}: negative durations are not allowed")]
    Negative(String),
    #[error("{0:?}: too long")]
    Overflow(String),
}

/// Parses Go's duration syntax.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let owned = || text.to_owned();
    let rest = text.trim();
    if rest.is_empty() {
        return Err(DurationError::Empty(owned()));
    }
    if rest.starts_with('-') {
        return Err(DurationError::Negative(owned()));
    }
    let mut rest = rest.strip_prefix('+').unwrap_or(rest);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        if unit.is_empty() {
            return Err(DurationError::MissingUnit(owned(), number.to_owned()));
        }
        let value: f64 = number
            .parse()
            .map_err(|_| DurationError::NotANumber(owned(), unit.to_owned()))?;
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(DurationError::UnknownUnit(owned(), unit.to_owned())),
        };
        total += value * seconds;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|_| DurationError::Overflow(owned()))
}

/// As Go prints it, for messages: `24h0m0s`, `1m30s`, `500ms`.
pub fn display(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gos_syntax() {
        let s = Duration::from_secs;
        assert_eq!(parse("24h0m0s"), Ok(s(86400)));
        assert_eq!(parse("1h"), Ok(s(3600)));
        assert_eq!(parse("90s"), Ok(s(90)));
        assert_eq!(parse("1.5h"), Ok(s(5400)));
        assert_eq!(parse("1m30s"), Ok(s(90)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert!(matches!(parse("60"), Err(DurationError::MissingUnit(..))));
        assert!(matches!(parse("5d"), Err(DurationError::UnknownUnit(..))));
        assert!(matches!(parse("-1s"), Err(DurationError::Negative(..))));
        assert!(matches!(parse(""), Err(DurationError::Empty(..))));
        assert!(matches!(parse("h"), Err(DurationError::NotANumber(..))));
        assert_eq!(display(s(86400)), "24h0m0s");
        assert_eq!(display(s(90)), "1m30s");
    }
}
