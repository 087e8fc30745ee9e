//! The latency histogram the usage rollups keep (usage_daily, usage_hourly: `latency_hist`), so
//! that reports give latency percentiles without reading raw usage rows.
//!
//! Buckets are fixed: bucket `i` (1-based, as PostgreSQL's `width_bucket` counts) holds latencies
//! in `[LATENCY_BOUNDS_MS[i-1], LATENCY_BOUNDS_MS[i])` milliseconds, the last one everything from
//! 600 s up. The bounds grow by about 20-25% per bucket (1 ms steps below 6 ms), so a percentile
//! read from the histogram is within one bucket of the true value: at most about a quarter of it
//! (1 ms below 6 ms; the last bucket answers its lower bound, 600 s).
//!
//! The writer adds a row's latency to bucket [`bucket`]; rollup rows store the counts as a
//! `bigint[]` of [`BUCKETS`] entries (summed with `tollgate_hist_add` / `tollgate_hist_sum`, see
//! the reports migration). The bounds never change once rows exist: a new resolution would need
//! a new column.

/// Lower bounds of the buckets, in milliseconds.
pub const LATENCY_BOUNDS_MS: [i64; 56] = [
    0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400, 500, 600, 800,
    1_000, 1_200, 1_500, 2_000, 2_500, 3_000, 4_000, 5_000, 6_000, 8_000, 10_000, 12_000, 15_000, 20_000, 25_000,
    30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 120_000, 150_000, 200_000, 250_000, 300_000, 400_000, 600_000,
];

/// How many buckets a histogram has.
pub const BUCKETS: usize = LATENCY_BOUNDS_MS.len();

/// The 1-based bucket of a latency (negative latencies count as 0).
pub fn bucket(latency_ms: i64) -> i32 {
    let ms = latency_ms.max(0);
    LATENCY_BOUNDS_MS.partition_point(|&lower| lower <= ms) as i32
}

/// The `q`-quantile (0 < q <= 1) of the latencies a histogram counted, in milliseconds: the
/// bucket holding the `ceil(q * n)`-th latency, interpolated linearly within it (the last,
/// unbounded bucket answers its lower bound). `None` for an empty histogram. Counts beyond
/// [`BUCKETS`] are ignored; fewer are taken as zeros.
pub fn quantile(counts: &[i64], q: f64) -> Option<f64> {
    let counts = &counts[..counts.len().min(BUCKETS)];
    let total: i64 = counts.iter().map(|&c| c.max(0)).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as i64).max(1);
    let mut seen = 0;
    for (i, &c) in counts.iter().enumerate() {
        let c = c.max(0);
        if c == 0 {
            continue;
        }
        if seen + c >= rank {
            let lower = LATENCY_BOUNDS_MS[i] as f64;
            let Some(&upper) = LATENCY_BOUNDS_MS.get(i + 1) else { return Some(lower) };
            let within = (rank - seen) as f64 / c as f64;
            return Some(lower + (upper as f64 - lower) * within);
        }
        seen += c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_latency() {
        assert_eq!(bucket(-5), 1);
        assert_eq!(bucket(0), 1);
        assert_eq!(bucket(1), 2);
        assert_eq!(bucket(7), 7);
        assert_eq!(bucket(8), 8);
        assert_eq!(bucket(599_999), BUCKETS as i32 - 1);
        assert_eq!(bucket(10_000_000), BUCKETS as i32);
        assert!(LATENCY_BOUNDS_MS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn quantiles_are_within_one_bucket() {
        // 100 latencies: 1..=100 ms.
        let mut counts = vec![0i64; BUCKETS];
        for ms in 1..=100 {
            counts[bucket(ms) as usize - 1] += 1;
        }
        for (q, truth) in [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0)] {
            let got = quantile(&counts, q).unwrap();
            let b = bucket(truth as i64) as usize;
            let (lo, hi) = (LATENCY_BOUNDS_MS[b.saturating_sub(2)], LATENCY_BOUNDS_MS[b.min(BUCKETS - 1)]);
            assert!((lo as f64..=hi as f64).contains(&got), "q{q}: {got}, truth {truth}");
        }
        assert_eq!(quantile(&[], 0.5), None);
        let mut slow = vec![0i64; BUCKETS];
        slow[BUCKETS - 1] = 3;
        assert_eq!(quantile(&slow, 0.5), Some(600_000.0));
    }
}
