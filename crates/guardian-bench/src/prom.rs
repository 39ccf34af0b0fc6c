//! Reading counters from a Prometheus text exposition (the reference
//! server's `metrics_text()`), to count requests without touching clients.

/// The sum of every sample of `metric` over all its label sets (samples of
/// other metrics sharing the prefix, such as `metric_bucket`, are ignored).
pub fn sum(text: &str, metric: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_labels() {
        let text = "# HELP guardian_http_requests_total x\n\
                    # TYPE guardian_http_requests_total counter\n\
                    guardian_http_requests_total{method=\"PUT\",route=\"/a\",status=\"200\"} 7\n\
                    guardian_http_requests_total{method=\"POST\",route=\"/b\",status=\"201\"} 5\n\
                    guardian_http_requests_total_extra 100\n\
                    guardian_applied_total 3\n";
        assert_eq!(sum(text, "guardian_http_requests_total"), 12);
        assert_eq!(sum(text, "guardian_applied_total"), 3);
        assert_eq!(sum(text, "missing"), 0);
    }
}
