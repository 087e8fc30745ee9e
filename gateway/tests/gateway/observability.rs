//! Logs never carry a key; metrics count traffic without per-key labels; health and readiness.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn no_key_in_any_log_line_and_metrics_without_key_labels(db: PgPool) {
    let stack = Stack::start_with(db, vec![("RUST_LOG", "trace")]).await;
    let (key, key_id, _) = stack.ready_key("logs@example.com", &["m"]).await;
    let wrong = tollgate_core::keys::generate_key();
    let body = json!({"model": "m", "messages": user_msg("hi")});
    assert_eq!(stack.chat(&key, body.clone()).send().await.unwrap().status(), StatusCode::OK);
    let stream = json!({"model": "m", "stream": true, "messages": user_msg("hi")});
    stack.chat(&key, stream).send().await.unwrap().text().await.unwrap();
    assert_eq!(stack.chat(&wrong, body.clone()).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let resp = stack
        .http
        .post(format!("{}/v1/embeddings", stack.gateway.base))
        .header("x-api-key", &key)
        .json(&json!({"model": "nope", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    stack.post_admin(&format!("/keys/{key_id}/revoke"), json!({})).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(stack.chat(&key, body).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    stack.wait_usage_rows(2).await;

    let logs = stack.gateway.logs();
    assert!(logs.lines().count() > 20, "trace logging produced too little to be a fair check:\n{logs}");
    for secret in
        [key.clone(), wrong.clone(), key[6..].to_string(), wrong[6..].to_string(), "sk-upstream-credential".to_string()]
    {
        let leak = logs.lines().find(|l| l.contains(secret.as_str())).map(|l| l.replace(secret.as_str(), "<SECRET>"));
        assert!(leak.is_none(), "a secret appears in the gateway's logs: {}", leak.unwrap_or_default());
    }

    let metrics =
        stack.http.get(format!("{}/metrics", stack.gateway.admin)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"tollgate_gateway_requests_total{model="m",outcome="success",status="2xx"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tollgate_gateway_rejections_total{reason="invalid_api_key",scope="request"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_gateway_key_cache_hits_total"));
    assert!(metrics.contains("tollgate_gateway_usage_rows_flushed_total 2"), "{metrics}");
    assert!(!metrics.contains(&key_id) && !metrics.contains(&key[6..]), "per-key data in metrics");

    let ready: Value =
        stack.http.get(format!("{}/ready", stack.gateway.admin)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["postgres"], true);
    let health = stack.http.get(format!("{}/health", stack.gateway.admin)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}
