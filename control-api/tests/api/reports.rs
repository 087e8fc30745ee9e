//! Usage reports and lists: usage by subscription and by two dimensions at once, latency
//! percentiles from the rollups' histograms, adjustments as lines of their own, CSV that Python's
//! csv module reads back as the JSON's figures, `total` on every list, and the audit trail's time
//! range, user agent and CSV export.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};
use sqlx::PgPool;
use tollgate_core::latency::{bucket, BUCKETS, LATENCY_BOUNDS_MS};
use uuid::Uuid;

use crate::common::*;

/// Parses CSV with Python's csv module (strict, RFC 4180 quoting, newlines inside fields): the
/// header and the rows as objects keyed by it. Fails when a row's width differs from the header's.
fn python_csv(text: &str) -> (Vec<String>, Vec<Map<String, Value>>) {
    const SCRIPT: &str = r#"
import csv, io, json, sys
reader = csv.reader(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline=""), strict=True)
header = next(reader)
rows = []
for row in reader:
    if len(row) != len(header):
        sys.exit(f"row of {len(row)} fields under a header of {len(header)}: {row}")
    rows.append(dict(zip(header, row)))
json.dump({"header": header, "rows": rows}, sys.stdout)
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python csv: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let header = v["header"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect();
    let rows = v["rows"].as_array().unwrap().iter().map(|r| r.as_object().unwrap().clone()).collect();
    (header, rows)
}

async fn get_csv(app: &TestApp, path: &str, accept: bool) -> String {
    let mut req = app.request(Method::GET, path, &app.admin_key);
    if accept {
        req = req.header("accept", "text/csv");
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{path}");
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/csv"), "{path}: {ct}");
    resp.text().await.unwrap()
}

/// A rollup row with a subscription and a latency histogram of `latencies` (ms).
#[allow(clippy::too_many_arguments)]
async fn rollup(
    db: &PgPool,
    day: &str,
    key: Uuid,
    model: &str,
    user: Uuid,
    sub: Option<Uuid>,
    requests: i64,
    errors: i64,
    cost: &str,
    latencies: &[i64],
) {
    let picks: Vec<i32> = latencies.iter().map(|&ms| bucket(ms)).collect();
    sqlx::query(
        "INSERT INTO usage_daily (day, key_id, model_id, user_id, team_id, subscription_id, requests, errors,
                                  prompt_tokens, completion_tokens, cost, latency_hist)
         VALUES ($1::date, $2, $3, $4, $5, $6, $7, $8, $7 * 10, $7 * 5, $9::numeric, tollgate_hist_of($10, $11))",
    )
    .bind(day)
    .bind(key)
    .bind(model)
    .bind(user)
    .bind(tollgate_core::DEFAULT_TEAM_ID)
    .bind(sub)
    .bind(requests)
    .bind(errors)
    .bind(cost)
    .bind(&picks)
    .bind(BUCKETS as i32)
    .execute(db)
    .await
    .unwrap();
}

fn rows(report: &Value) -> Vec<Value> {
    report["data"].as_array().unwrap_or_else(|| panic!("no data: {report}")).clone()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Two users, two models, subscriptions, keys and a day of usage: `(alice, bob, subs)`.
async fn seeded(app: &TestApp) -> (Value, Value, Vec<Value>) {
    let alice =
        app.admin_post("/api/v1/users", json!({"email": "alice@example.com", "name": "Doe, \"AJ\" Alice"})).await;
    let bob = app.create_user("bob@example.com").await;
    app.create_model("m1").await;
    app.create_model("m2").await;
    let mut subs = Vec::new();
    for user in [&alice, &bob] {
        for model in ["m1", "m2"] {
            subs.push(app.subscribe(&id(user), model).await);
        }
    }
    let (ka, kb) = (Uuid::new_v4(), Uuid::new_v4());
    let uid = |v: &Value| id(v).parse::<Uuid>().unwrap();
    let sid = |i: usize| Some(uid(&subs[i]));
    rollup(&app.db, "2026-03-01", ka, "m1", uid(&alice), sid(0), 3, 1, "0.003", &[10, 20, 30]).await;
    rollup(&app.db, "2026-03-02", ka, "m1", uid(&alice), sid(0), 2, 0, "0.002", &[40, 50]).await;
    rollup(&app.db, "2026-03-01", ka, "m2", uid(&alice), sid(1), 1, 0, "0.25", &[900]).await;
    rollup(&app.db, "2026-03-01", kb, "m1", uid(&bob), sid(2), 4, 2, "1.5", &[100, 200, 300, 400]).await;
    rollup(&app.db, "2026-03-02", kb, "m2", uid(&bob), sid(3), 5, 0, "0.0001", &[5, 5, 5, 5, 5]).await;
    (alice, bob, subs)
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn two_dimensions_add_up_to_one_and_subscriptions_group_and_filter(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (alice, _bob, subs) = seeded(&app).await;
    let range = "from=2026-03-01&to=2026-03-03";

    let (status, both) = app.get(&format!("/api/v1/usage?group_by=user,model&{range}"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{both}");
    assert_eq!(both["group_by"], "user,model");
    let both_rows = rows(&both);
    assert_eq!(both_rows.len(), 4, "{both}");
    let alice_m1 = both_rows.iter().find(|r| r["group"] == id(&alice) && r["group2"] == "m1").unwrap();
    assert_eq!(alice_m1["email"], "alice@example.com", "{alice_m1}");
    assert_eq!(alice_m1["name"], "Doe, \"AJ\" Alice");
    assert_eq!((alice_m1["requests"].as_i64(), alice_m1["errors"].as_i64()), (Some(5), Some(1)));
    for (dim, pos) in [("user", "group"), ("model", "group2")] {
        let (_, one) = app.get(&format!("/api/v1/usage?group_by={dim}&{range}"), &admin).await;
        for row in rows(&one) {
            let parts: Vec<&Value> = both_rows.iter().filter(|r| r[pos] == row["group"]).collect();
            for field in ["requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"] {
                let sum: i64 = parts.iter().map(|r| r[field].as_i64().unwrap()).sum();
                assert_eq!(sum, row[field].as_i64().unwrap(), "{dim} {field} of {}", row["group"]);
            }
            let cost: f64 = parts.iter().map(|r| f(&r["cost"])).sum();
            assert!((cost - f(&row["cost"])).abs() < 1e-9, "{dim} cost");
        }
        assert_eq!(one["totals"]["requests"], both["totals"]["requests"]);
        assert_eq!(one["totals"]["cost"], both["totals"]["cost"]);
    }
    // The model can come first too, and a day with a dimension.
    let (_, swapped) = app.get(&format!("/api/v1/usage?group_by=model,user&{range}"), &admin).await;
    assert_eq!(rows(&swapped).len(), 4);
    assert_eq!(swapped["data"][0]["group"], "m1");
    assert!(swapped["data"][0]["group2_labels"]["email"].is_string(), "{swapped}");
    let (_, by_day) = app.get(&format!("/api/v1/usage?group_by=day,model&{range}"), &admin).await;
    assert_eq!(rows(&by_day).len(), 4, "{by_day}");

    // By subscription: labelled with its owner and model; filtered by one.
    let (status, by_sub) = app.get(&format!("/api/v1/usage?group_by=subscription&{range}"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{by_sub}");
    assert_eq!(rows(&by_sub).len(), 4);
    let first = rows(&by_sub).into_iter().find(|r| r["group"] == id(&subs[0])).unwrap();
    assert_eq!((first["user_id"].as_str(), first["model_id"].as_str()), (Some(id(&alice).as_str()), Some("m1")));
    assert_eq!(first["requests"], 5);
    let (_, one_sub) =
        app.get(&format!("/api/v1/usage?group_by=model&subscription_id={}&{range}", id(&subs[3])), &admin).await;
    assert_eq!(rows(&one_sub).len(), 1);
    assert_eq!((one_sub["data"][0]["group"].as_str(), one_sub["totals"]["requests"].as_i64()), (Some("m2"), Some(5)));

    // Not a dimension: 400; dimensions that cannot go together: 422; both naming group_by.
    for (bad, expected) in [
        ("user,user", StatusCode::UNPROCESSABLE_ENTITY),
        ("day,hour", StatusCode::UNPROCESSABLE_ENTITY),
        ("user,model,key", StatusCode::UNPROCESSABLE_ENTITY),
        ("users", StatusCode::BAD_REQUEST),
        ("", StatusCode::BAD_REQUEST),
        ("user,", StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = app.get(&format!("/api/v1/usage?group_by={bad}&{range}"), &admin).await;
        assert_eq!(status, expected, "{bad}: {body}");
        assert_eq!(body["error"]["field"], "group_by", "{bad}");
    }
    let (status, body) = app.get(&format!("/api/v1/usage?subscription_id=nope&{range}"), &admin).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["field"], "subscription_id");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn latency_percentiles_come_from_the_histograms_within_one_bucket(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let user = Uuid::new_v4();
    // Known latencies spread over several rollup rows (days and keys) of one model.
    let all: Vec<i64> = (1..=300).map(|i| (i * 37) % 2500 + 3).collect();
    for (n, chunk) in all.chunks(70).enumerate() {
        let day = format!("2026-04-0{}", n % 3 + 1);
        rollup(&app.db, &day, Uuid::new_v4(), "lat", user, None, chunk.len() as i64, 0, "0", chunk).await;
    }
    let (status, r) =
        app.get("/api/v1/usage?group_by=model&from=2026-04-01&to=2026-04-05", &app.admin_key.clone()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let mut sorted = all.clone();
    sorted.sort_unstable();
    for (field, q) in [("latency_p50_ms", 0.5), ("latency_p95_ms", 0.95)] {
        let truth = sorted[(q * sorted.len() as f64).ceil() as usize - 1];
        for row in [&r["data"][0], &r["totals"]] {
            let got = f(&row[field]);
            let b = bucket(truth) as usize;
            let (lo, hi) =
                (LATENCY_BOUNDS_MS[b.saturating_sub(2)] as f64, LATENCY_BOUNDS_MS[b.min(BUCKETS - 1)] as f64);
            assert!((lo..=hi).contains(&got), "{field}: {got} not within a bucket of {truth}");
        }
    }
    // Rows without latency data (written before the histogram existed) have no percentiles.
    sqlx::query("UPDATE usage_daily SET latency_hist = '{}'").execute(&app.db).await.unwrap();
    let (_, r) = app.get("/api/v1/usage?group_by=model&from=2026-04-01&to=2026-04-05", &app.admin_key.clone()).await;
    assert!(r["data"][0].get("latency_p50_ms").is_none(), "{r}");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn adjustments_are_lines_of_their_own(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (alice, bob, subs) = seeded(&app).await;
    let adjust = |scope: &'static str, scope_id: String, nanos: i64, at: &'static str| {
        let db = app.db.clone();
        async move {
            sqlx::query(
                "INSERT INTO budget_adjustments (scope, scope_id, period, amount_nanos, reason, actor, created_at)
                 VALUES ($1, $2::uuid, 'all', $3, 'refund, \"outage\"', 'admin-key:test', $4::timestamptz)",
            )
            .bind(scope)
            .bind(scope_id)
            .bind(nanos)
            .bind(at)
            .execute(&db)
            .await
            .unwrap();
        }
    };
    adjust("user", id(&alice), -500_000_000, "2026-03-01T12:00:00Z").await; // a $0.50 credit
    adjust("subscription", id(&subs[3]), 1_250_000, "2026-03-02T08:00:00Z").await; // bob, m2: +$0.00125
    adjust("user", id(&bob), 7_000_000_000, "2026-04-01T00:00:00Z").await; // outside the range
    let range = "from=2026-03-01&to=2026-03-03";

    let (status, r) = app.get(&format!("/api/v1/usage?group_by=user&{range}"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let lines = rows(&r);
    let adjustments: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "adjustment").collect();
    assert_eq!(adjustments.len(), 2, "{r}");
    assert_eq!(f(&adjustments[0]["cost"]), -0.5);
    assert_eq!(adjustments[0]["group"], id(&alice));
    assert_eq!(adjustments[0]["adjustment"]["reason"], "refund, \"outage\"");
    assert_eq!(adjustments[1]["group"], id(&bob), "a subscription's adjustment belongs to its user");
    assert_eq!(f(&adjustments[1]["cost"]), 0.00125);
    let usage_cost: f64 = lines.iter().filter(|l| l["kind"] == "usage").map(|l| f(&l["cost"])).sum();
    assert!((f(&r["adjustments_cost"]) - (-0.49875)).abs() < 1e-12, "{r}");
    assert!((f(&r["totals"]["cost"]) - (usage_cost - 0.49875)).abs() < 1e-9, "{r}");

    // Filters reach adjustments too: by model (its subscriptions), by user.
    let (_, m2) = app.get(&format!("/api/v1/usage?group_by=model&model_id=m2&{range}"), &admin).await;
    let adj: Vec<Value> = rows(&m2).into_iter().filter(|l| l["kind"] == "adjustment").collect();
    assert_eq!(adj.len(), 1);
    assert_eq!(adj[0]["group"], "m2");
    let (_, mine) = app.get(&format!("/api/v1/usage?group_by=model&user_id={}&{range}", id(&alice)), &admin).await;
    let adj: Vec<Value> = rows(&mine).into_iter().filter(|l| l["kind"] == "adjustment").collect();
    assert_eq!((adj.len(), adj[0]["group"].as_str()), (1, Some("")), "a user's adjustment names no model");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn usage_csv_parses_with_python_and_matches_the_json(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (alice, _, _) = seeded(&app).await;
    sqlx::query(
        "INSERT INTO budget_adjustments (scope, scope_id, period, amount_nanos, reason, actor, created_at)
         VALUES ('user', $1::uuid, 'all', -1000, e'two\\nlines, \"quoted\"', 'admin-key:test', '2026-03-01T09:00:00Z')",
    )
    .bind(id(&alice))
    .execute(&app.db)
    .await
    .unwrap();
    for (query, accept) in [
        ("group_by=user,model&format=csv", false),
        ("group_by=key", true),
        ("group_by=subscription,day&format=csv", false),
        ("group_by=hour&format=csv", false),
    ] {
        let path = format!("/api/v1/usage?{query}&from=2026-03-01&to=2026-03-03");
        let json_path = path.replace("&format=csv", "");
        let (_, json) = app.get(&json_path, &admin).await;
        let text = get_csv(&app, &path, accept).await;
        assert!(text.ends_with("\r\n"), "{text}");
        let (header, csv_rows) = python_csv(&text);
        assert_eq!(header[..2], ["kind".to_string(), "group".to_string()]);
        let mut expected = rows(&json);
        expected.push(json["totals"].clone());
        assert_eq!(csv_rows.len(), expected.len(), "{query}: {text}");
        for (c, j) in csv_rows.iter().zip(&expected) {
            let text_of = |v: &Value| match v {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            for field in ["kind", "group", "group2", "name", "email", "key_prefix", "user_id", "model_id"] {
                assert_eq!(c[field].as_str().unwrap(), text_of(&j[field]), "{query} {field}");
            }
            for field in ["requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"] {
                assert_eq!(c[field].as_str().unwrap().parse::<i64>().unwrap(), j[field].as_i64().unwrap(), "{field}");
            }
            for field in ["cost", "latency_p50_ms", "latency_p95_ms"] {
                let got = c[field].as_str().unwrap();
                match j.get(field) {
                    Some(v) if !v.is_null() => assert_eq!(got.parse::<f64>().unwrap(), f(v), "{query} {field}"),
                    _ => assert_eq!(got, "", "{query} {field}"),
                }
            }
            if j["kind"] == "adjustment" {
                assert_eq!(c["adjustment_reason"].as_str(), j["adjustment"]["reason"].as_str());
                assert_eq!(c["adjustment_id"].as_str(), j["adjustment"]["id"].as_str());
            }
        }
    }
    // Errors stay JSON.
    let resp = app.request(Method::GET, "/api/v1/usage?format=csv&group_by=nope", &admin).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (status, _) = app.get("/api/v1/usage?format=xml", &admin).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn audit_filters_by_time_records_user_agents_and_exports_csv(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let long_agent = format!("agent, \"quoted\" {}", "x".repeat(400));
    for i in 0..7 {
        let resp = app
            .request(Method::POST, "/api/v1/teams", &admin)
            .header("user-agent", if i == 0 { long_agent.as_str() } else { "tollgate-tests/1.0" })
            .json(&json!({"name": format!("t{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
    // Spread the entries over days.
    sqlx::query("UPDATE audit_logs SET created_at = '2026-02-01T00:00:00Z'::timestamptz + (id * interval '1 day')")
        .execute(&app.db)
        .await
        .unwrap();
    let (_, all) = app.get("/api/v1/audit?action=team.create", &admin).await;
    assert_eq!(all["total"], 7);
    let agent = all["data"][6]["user_agent"].as_str().unwrap();
    assert!(agent.starts_with("agent, \"quoted\" x") && agent.chars().count() == 256, "bounded: {agent}");
    assert_eq!(all["data"][0]["user_agent"], "tollgate-tests/1.0");

    let day = |n: i64| (chrono::NaiveDate::from_ymd_opt(2026, 2, 1).unwrap() + chrono::Duration::days(n)).to_string();
    let first_id = all["data"][6]["id"].as_i64().unwrap();
    let (status, window) =
        app.get(&format!("/api/v1/audit?from={}&to={}", day(first_id + 1), day(first_id + 3)), &admin).await;
    assert_eq!(status, StatusCode::OK, "{window}");
    assert_eq!(window["total"], 2, "{window}");
    let ids: Vec<i64> = window["data"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [first_id + 2, first_id + 1]);
    let (_, rfc) = app.get(&format!("/api/v1/audit?from={}T00:00:00%2B00:00", day(first_id + 6)), &admin).await;
    assert_eq!(rfc["total"], 1);

    for (query, field, status) in [
        ("from=yesterday", "from", StatusCode::BAD_REQUEST),
        ("to=2026-13-01", "to", StatusCode::BAD_REQUEST),
        ("from=2026-03-02&to=2026-03-01", "from", StatusCode::UNPROCESSABLE_ENTITY),
        ("to=1999-01-01", "to", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (got, body) = app.get(&format!("/api/v1/audit?{query}"), &admin).await;
        assert_eq!((got, body["error"]["field"].as_str()), (status, Some(field)), "{query}: {body}");
    }

    // CSV: every entry (more than a page), the same figures as the JSON.
    let (_, json) = app.get("/api/v1/audit?limit=500", &admin).await;
    let (header, csv_rows) = python_csv(&get_csv(&app, "/api/v1/audit?format=csv", false).await);
    assert_eq!(header.len(), 12);
    assert_eq!(csv_rows.len() as i64, json["total"].as_i64().unwrap());
    for (c, j) in csv_rows.iter().zip(json["data"].as_array().unwrap()) {
        assert_eq!(c["id"].as_str().unwrap(), j["id"].to_string());
        assert_eq!(c["action"].as_str(), j["action"].as_str());
        assert_eq!(c["user_agent"].as_str().unwrap(), j["user_agent"].as_str().unwrap_or(""));
        let details: Value = serde_json::from_str(c["details"].as_str().unwrap()).unwrap();
        assert_eq!(details, j["details"]);
    }
    let (_, page) = app.get("/api/v1/audit?limit=2&offset=1&action=team.create", &admin).await;
    let (_, csv_page) = python_csv(&get_csv(&app, "/api/v1/audit?limit=2&offset=1&action=team.create", true).await);
    let ids: Vec<String> = page["data"].as_array().unwrap().iter().map(|r| r["id"].to_string()).collect();
    let csv_ids: Vec<String> = csv_page.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, csv_ids);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn every_list_carries_its_total(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (user, _) = app.subscribed_user("tot@example.com", "m1").await;
    app.create_model("m2").await;
    app.subscribe(&id(&user), "m2").await;
    for _ in 0..3 {
        app.create_key(&id(&user), &["m1"]).await;
    }
    let team = app.admin_post("/api/v1/teams", json!({"name": "Totals"})).await;
    app.admin_post(&format!("/api/v1/teams/{}/members", id(&team)), json!({"user_id": id(&user)})).await;
    let admin = app.admin_key.clone();
    for (path, total) in [
        ("/api/v1/users?limit=1".to_string(), 1),
        ("/api/v1/teams?limit=1".to_string(), 2),
        (format!("/api/v1/teams/{}/members?limit=1", id(&team)), 1),
        ("/api/v1/models?limit=1".to_string(), 2),
        ("/api/v1/subscriptions?limit=1".to_string(), 2),
        ("/api/v1/keys?limit=1&offset=1".to_string(), 3),
        ("/api/v1/keys?limit=1&offset=50".to_string(), 3),
        ("/api/v1/audit?limit=1&action=key.create".to_string(), 3),
    ] {
        let (status, page) = app.get(&path, &admin).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        assert_eq!(page["total"], total, "{path}: {page}");
    }
}
