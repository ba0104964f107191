//! Latency summaries.

use serde::Serialize;

/// Summary of a set of latencies, in milliseconds.
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99_9")]
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentile of sorted microsecond samples, in ms.
fn pct(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted_us.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted_us.len()) - 1;
    round3(sorted_us[idx] as f64 / 1000.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Summarises latency samples given in microseconds.
pub fn summarize(mut samples_us: Vec<u64>) -> Summary {
    samples_us.sort_unstable();
    let count = samples_us.len();
    let mean = if count == 0 {
        0.0
    } else {
        round3(samples_us.iter().map(|&v| v as f64).sum::<f64>() / count as f64 / 1000.0)
    };
    Summary {
        count,
        p50: pct(&samples_us, 0.50),
        p90: pct(&samples_us, 0.90),
        p99: pct(&samples_us, 0.99),
        p999: pct(&samples_us, 0.999),
        max: samples_us.last().map_or(0.0, |&v| round3(v as f64 / 1000.0)),
        mean,
    }
}

/// Rounds for JSON output.
pub fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::summarize;

    #[test]
    fn percentiles() {
        let s = summarize((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.p999, 100.0);
        assert_eq!(s.max, 100.0);
        let long = summarize((1..=2000).map(|ms| ms * 1000).collect());
        assert_eq!(long.p999, 1998.0);
        assert_eq!(s.mean, 50.5);
        let empty = summarize(vec![]);
        assert_eq!(empty.count, 0);
        assert_eq!(empty.p99, 0.0);
    }
}
