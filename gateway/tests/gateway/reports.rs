//! What the usage writer leaves for reports: errors and a latency histogram in the rollups, from
//! which the control API's usage report computes percentiles within one bucket of the truth.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tollgate_core::latency::{bucket, quantile, BUCKETS, LATENCY_BOUNDS_MS};

use crate::harness::*;

/// The true `q`-quantile of sorted latencies (the `ceil(q n)`-th).
fn true_quantile(sorted: &[i64], q: f64) -> i64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1]
}

/// Whether `got` lies within one bucket of `truth`: between the lower bound of the bucket below
/// the truth's and the upper bound of the bucket above it.
fn within_one_bucket(got: f64, truth: i64) -> bool {
    let b = bucket(truth) as usize; // 1-based
    let lo = LATENCY_BOUNDS_MS[b.saturating_sub(2)] as f64;
    let hi = LATENCY_BOUNDS_MS.get(b + 1).map_or(f64::INFINITY, |&h| h as f64);
    (lo..=hi).contains(&got)
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn rollups_keep_a_latency_histogram_and_errors(db: PgPool) {
    // Known latencies: a spread for one model, all slow for another; a few errors; written in two
    // batches (the second adds to the rows of the first) and one batch replayed (counted once).
    let fast: Vec<i32> = (0..200).map(|i| 3 + (i * i) % 997).collect();
    let rows: Vec<_> = fast
        .iter()
        .enumerate()
        .map(|(i, &ms)| usage_row(format!("lat-fast-{i}"), "fast", ms, if i % 10 == 0 { 502 } else { 200 }))
        .collect();
    let (first, second) = rows.split_at(120);
    tollgate_gateway::usage::insert(&db, first).await.unwrap();
    tollgate_gateway::usage::insert(&db, second).await.unwrap();
    tollgate_gateway::usage::insert(&db, second).await.unwrap();
    let slow: Vec<_> = (0..5).map(|i| usage_row(format!("lat-slow-{i}"), "slow", 45_000 + i, 200)).collect();
    tollgate_gateway::usage::insert(&db, &slow).await.unwrap();

    for (table, model, latencies, errors) in [
        ("usage_daily", "fast", &fast, 20),
        ("usage_hourly", "fast", &fast, 20),
        ("usage_daily", "slow", &vec![45_000; 5], 0),
    ] {
        let (hist, requests, errs): (Vec<i64>, i64, i64) = sqlx::query_as(&format!(
            "SELECT tollgate_hist_sum(latency_hist), sum(requests)::bigint, sum(errors)::bigint
             FROM {table} WHERE model_id = $1"
        ))
        .bind(model)
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(hist.len(), BUCKETS, "{table} {model}");
        assert_eq!(hist.iter().sum::<i64>(), requests, "{table} {model}: every request in the histogram once");
        assert_eq!(requests, latencies.len() as i64);
        assert_eq!(errs, errors);
        let mut sorted: Vec<i64> = latencies.iter().map(|&l| l as i64).collect();
        sorted.sort_unstable();
        for q in [0.5, 0.95, 0.99] {
            let got = quantile(&hist, q).unwrap();
            let truth = true_quantile(&sorted, q);
            assert!(within_one_bucket(got, truth), "{table} {model} q{q}: {got} vs {truth}");
        }
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn usage_report_latency_matches_the_requests_served(db: PgPool) {
    let stack = Stack::start(db.clone()).await;
    let (key, _, _) = stack.ready_key("latency@example.com", &["m"]).await;
    let body = json!({"model": "m", "messages": user_msg("hi")});
    // 8 quick answers, 2 slow ones, 1 upstream error.
    for ttfb in [0, 0, 0, 0, 0, 0, 0, 0, 400, 400] {
        let resp = stack.chat(&key, body.clone()).header("x-mock-ttfb-ms", ttfb.to_string()).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let resp = stack.chat(&key, body.clone()).header("x-mock-status", "500").send().await.unwrap();
    assert!(resp.status().is_server_error());
    stack.wait_usage_rows(11).await;

    let mut latencies: Vec<i64> =
        sqlx::query_scalar("SELECT latency_ms::bigint FROM usage_logs ORDER BY 1").fetch_all(&db).await.unwrap();
    latencies.sort_unstable();
    let report = stack.admin(reqwest::Method::GET, "/usage?group_by=model", Value::Null).await;
    let m = &report["data"][0];
    assert_eq!(
        (m["group"].as_str(), m["requests"].as_i64(), m["errors"].as_i64()),
        (Some("m"), Some(11), Some(1)),
        "{report}"
    );
    for (field, q) in [("latency_p50_ms", 0.5), ("latency_p95_ms", 0.95)] {
        let got = m[field].as_f64().unwrap_or_else(|| panic!("no {field}: {report}"));
        let truth = true_quantile(&latencies, q);
        assert!(within_one_bucket(got, truth), "{field}: {got} vs {truth} of {latencies:?}");
    }
    assert!(m["latency_p95_ms"].as_f64().unwrap() >= 300.0, "{report}");
}
