//! Medians of repeated runs, and ratios taken pair by pair within one run.
//!
//! A shared machine drifts between runs (other builds start and stop), so a
//! ratio of two medians can pair a quiet run of one side with a loaded run of
//! the other. Ratios are therefore computed inside each run, where both sides
//! saw the same load, and the median of those per-run ratios is reported.

/// The median of `values` (mean of the two middle values for an even count);
/// `None` when empty or when a value is NaN.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    })
}

/// Smallest and largest of `values`; `None` when empty.
pub fn range(values: &[f64]) -> Option<(f64, f64)> {
    let mut it = values.iter().copied();
    let first = it.next()?;
    Some(it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v))))
}

/// Per-run ratios `a[i] / b[i]` (runs where `b[i]` is zero are skipped).
pub fn pairwise_ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(_, &d)| d != 0.0)
        .map(|(&n, &d)| n / d)
        .collect()
}

/// The median of the per-run ratios `a[i] / b[i]`.
pub fn median_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    median(&pairwise_ratios(a, b))
}

/// Samples of one measured quantity, one per run, in run order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples {
    values: Vec<f64>,
}

impl Samples {
    /// No samples yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the value measured in the next run.
    pub fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    /// The samples in run order.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Their median; `None` when there is none.
    pub fn median(&self) -> Option<f64> {
        median(&self.values)
    }

    /// Their smallest and largest; `None` when there is none.
    pub fn range(&self) -> Option<(f64, f64)> {
        range(&self.values)
    }

    /// The median of per-run ratios `self / other`.
    pub fn ratio_to(&self, other: &Self) -> Option<f64> {
        median_ratio(&self.values, &other.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ratios_are_paired_within_each_run() {
        // Run 2 was loaded for both sides: the paired ratio stays at 2.
        let ours = [200.0, 100.0, 200.0];
        let peer = [100.0, 50.0, 100.0];
        assert_eq!(median_ratio(&ours, &peer), Some(2.0));
        assert_eq!(pairwise_ratios(&[1.0, 2.0], &[0.0, 1.0]), vec![2.0]);
    }

    #[test]
    fn samples_report_range_and_ratio() {
        let mut a = Samples::new();
        let mut b = Samples::new();
        for (x, y) in [(1.0, 2.0), (3.0, 2.0), (2.0, 4.0)] {
            a.push(x);
            b.push(y);
        }
        assert_eq!(a.range(), Some((1.0, 3.0)));
        assert_eq!(a.median(), Some(2.0));
        assert_eq!(a.ratio_to(&b), Some(0.5));
        assert_eq!(a.values().len(), 3);
    }
}
