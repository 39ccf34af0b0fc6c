//! Markdown tables and number formatting for `BENCHMARKS.md`.

use std::fmt::Write as _;

/// A Markdown table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells are left empty, extra cells dropped).
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    /// The table as GitHub-flavoured Markdown (pipes in cells escaped).
    pub fn to_markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = String::new();
        let line = |cells: &[String]| {
            let inner: Vec<String> = cells.iter().map(|c| esc(c)).collect();
            format!("| {} |\n", inner.join(" | "))
        };
        out.push_str(&line(&self.headers));
        let _ = writeln!(out, "|{}", "---|".repeat(self.headers.len()));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// A count with thousands separators: `12345.6` → `12,346`.
pub fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    // Rounded and clamped: these are rates and counts, far below 2^53.
    #[allow(clippy::cast_possible_truncation)]
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// A ratio as `0.93×` (two significant decimals below 10, one above).
pub fn ratio(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v >= 10.0 => format!("{v:.1}×"),
        Some(v) if v.is_finite() => format!("{v:.2}×"),
        _ => "n/a".into(),
    }
}

/// A duration in milliseconds with sensible precision.
pub fn millis(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v >= 100.0 => format!("{v:.0} ms"),
        Some(v) if v.is_finite() => format!("{v:.1} ms"),
        _ => "n/a".into(),
    }
}

/// A target line: `met` or `**missed**` plus the measured figure.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_markdown() {
        let mut t = Table::new(["a", "b"]);
        t.row(["1", "x|y"]);
        t.row(["2"]);
        assert_eq!(
            t.to_markdown(),
            "| a | b |\n|---|---|\n| 1 | x\\|y |\n| 2 |  |\n"
        );
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.5), "1,000");
        assert_eq!(thousands(-12_000.0), "-12,000");
        assert_eq!(thousands(f64::NAN), "n/a");
        assert_eq!(ratio(Some(0.934)), "0.93×");
        assert_eq!(ratio(Some(12.34)), "12.3×");
        assert_eq!(ratio(None), "n/a");
        assert_eq!(millis(Some(12.345)), "12.3 ms");
        assert_eq!(millis(Some(1234.5)), "1234 ms");
        assert_eq!(verdict(true), "met");
    }
}
