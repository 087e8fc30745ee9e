//! Many mixed requests: usage_logs and usage_daily agree with the upstream request for request,
//! and SIGTERM in the middle of load loses no row.

use std::{collections::HashMap, sync::Arc};

use futures::{stream, StreamExt};
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;

use crate::harness::*;

#[derive(Debug, Clone)]
struct Expected {
    key_id: String,
    model: String,
    prompt: i64,
    completion: i64,
    interrupted: bool,
}

/// Request `i` of the mix: model, stream?, include_usage?, interrupted?, words, chunks.
fn shape(i: usize) -> (&'static str, bool, bool, bool, usize, usize) {
    let model = ["m1", "m2", "m3"][i % 3];
    let stream = i % 2 == 1;
    let include_usage = stream && i % 4 == 1;
    let interrupted = stream && i % 10 == 3;
    (model, stream, include_usage, interrupted, 1 + i % 7, 1 + i % 5)
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn thousand_mixed_requests_are_metered_exactly(db: PgPool) {
    let stack = Arc::new(Stack::start(db).await);
    for m in ["m1", "m2", "m3"] {
        stack.model(m).await;
    }
    let mut keys = Vec::new();
    for u in 0..4 {
        let (key, key_id, _) = stack.key_for(&format!("load{u}@example.com"), &["m1", "m2", "m3"]).await;
        keys.push((key, key_id));
    }
    stack.wait_model(&keys[0].0, "m3").await;
    let keys = Arc::new(keys);

    let results: Vec<(String, Expected)> = stream::iter(0..1000usize)
        .map(|i| {
            let (stack, keys) = (stack.clone(), keys.clone());
            async move {
                let (model, stream, include_usage, interrupted, words, chunks) = shape(i);
                let (key, key_id) = &keys[i % keys.len()];
                let mut body = json!({"model": model, "stream": stream,
                    "messages": user_msg(&vec!["w"; words].join(" "))});
                if include_usage {
                    body["stream_options"] = json!({"include_usage": true});
                }
                let mut req = stack.chat(key, body).header("x-mock-chunks", chunks.to_string());
                if interrupted {
                    req = req.header("x-mock-drop-after", "1");
                }
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200, "request {i}");
                let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
                let body = resp.bytes().await;
                assert_eq!(body.is_err(), interrupted, "request {i}: interrupted streams are cut");
                (
                    request_id,
                    Expected {
                        key_id: key_id.clone(),
                        model: model.into(),
                        prompt: words as i64,
                        completion: chunks as i64,
                        interrupted,
                    },
                )
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    stack.wait_usage_rows(1000).await;
    type Row = (String, String, String, i64, i64, Decimal, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT request_id, key_id::text, model_id, prompt_tokens, completion_tokens, cost, error_kind FROM usage_logs",
    )
    .fetch_all(&stack.db)
    .await
    .unwrap();
    let rows: HashMap<String, _> = rows.into_iter().map(|r| (r.0.clone(), r)).collect();
    for (request_id, e) in &results {
        let row = rows.get(request_id).unwrap_or_else(|| panic!("no usage row for {request_id}"));
        assert_eq!((&row.1, &row.2), (&e.key_id, &e.model), "{request_id}");
        if e.interrupted {
            assert_eq!(row.6.as_deref(), Some("interrupted"), "{request_id}");
        } else {
            assert_eq!((row.3, row.4), (e.prompt, e.completion), "{request_id}");
            let cost = Decimal::new(e.prompt + 2 * e.completion, 6);
            assert_eq!(row.5, cost, "{request_id}");
            assert_eq!(row.6, None, "{request_id}");
        }
    }

    // The rollups are exactly the sum of the rows, per key and model.
    let mismatches: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT key_id, model_id, count(*) AS requests, sum(prompt_tokens) AS p, sum(completion_tokens) AS c, sum(cost) AS cost
            FROM usage_logs GROUP BY 1, 2) l
         FULL JOIN (SELECT key_id, model_id, sum(requests) AS requests, sum(prompt_tokens) AS p,
                           sum(completion_tokens) AS c, sum(cost) AS cost FROM usage_daily GROUP BY 1, 2) d
           USING (key_id, model_id)
         WHERE l.requests IS DISTINCT FROM d.requests OR l.p IS DISTINCT FROM d.p
            OR l.c IS DISTINCT FROM d.c OR l.cost IS DISTINCT FROM d.cost",
    )
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(mismatches, 0);
    let daily: i64 =
        sqlx::query_scalar("SELECT sum(requests)::bigint FROM usage_daily").fetch_one(&stack.db).await.unwrap();
    assert_eq!(daily, 1000);
    let hourly: i64 =
        sqlx::query_scalar("SELECT sum(requests)::bigint FROM usage_hourly").fetch_one(&stack.db).await.unwrap();
    assert_eq!(hourly, 1000);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn sigterm_under_load_loses_no_row(db: PgPool) {
    let mut stack = Stack::start(db).await;
    let (key, _, _) = stack.ready_key("term@example.com", &["m"]).await;
    let (http, base) = (stack.http.clone(), stack.gateway.base.clone());
    let load = tokio::spawn(async move {
        stream::iter(0..400usize)
            .map(|i| {
                let (http, base, key) = (http.clone(), base.clone(), key.clone());
                async move {
                    let resp = http
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .header("x-mock-ttfb-ms", "100")
                        .json(&json!({"model": "m", "stream": i % 2 == 0, "messages": user_msg("a b")}))
                        .send()
                        .await
                        .ok()?;
                    let id = resp.headers().get("x-request-id")?.to_str().ok()?.to_string();
                    resp.bytes().await.ok()?;
                    Some(id)
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<Option<String>>>()
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let status = stack.gateway.terminate().await;
    assert!(status.success(), "gateway exit: {status:?}\n{}", stack.gateway.logs());
    let answered: Vec<String> = load.await.unwrap().into_iter().flatten().collect();
    assert!(!answered.is_empty() && answered.len() < 400, "SIGTERM should land mid-load: {}", answered.len());
    // The process has exited: whatever it answered is already in PostgreSQL.
    let ids: Vec<String> = sqlx::query_scalar("SELECT request_id FROM usage_logs").fetch_all(&stack.db).await.unwrap();
    for id in &answered {
        assert!(ids.contains(id), "answered request {id} has no usage row");
    }
    let spooled = std::fs::read_dir(stack.gateway.log.parent().unwrap().join("spool"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false))
        .count();
    assert_eq!(spooled, 0, "rows left in the spool instead of PostgreSQL");
}
