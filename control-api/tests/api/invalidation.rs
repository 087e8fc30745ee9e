//! Every write that changes what the gateway enforces publishes `{kind, id}` on
//! `tollgate:invalidate` after its commit.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;
use tollgate_core::invalidation::{Invalidation, InvalidationKind::*, INVALIDATION_CHANNEL};

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn enforcing_writes_publish_invalidations(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(INVALIDATION_CHANNEL).await.unwrap();
    let admin = app.admin_key.clone();

    let mut expected: Vec<Invalidation> = Vec::new();
    app.create_model("inv-m").await;
    expected.push(Invalidation::new(Model, "inv-m"));
    app.patch("/api/v1/models/inv-m", &admin, json!({"output_cost_per_token": 0.5})).await;
    expected.push(Invalidation::new(Model, "inv-m"));
    let user = app.create_user("inv@example.com").await;
    let uid = id(&user);
    app.patch(&format!("/api/v1/users/{uid}"), &admin, json!({"limits": {"rpm": 1}})).await;
    expected.push(Invalidation::new(User, &uid));
    let sub = app.subscribe(&uid, "inv-m").await;
    let sid = id(&sub);
    expected.push(Invalidation::new(User, &uid));
    app.patch(&format!("/api/v1/subscriptions/{sid}"), &admin, json!({"limits": {"tpm": 5}})).await;
    expected.push(Invalidation::new(Subscription, &sid));
    app.admin_post(&format!("/api/v1/subscriptions/{sid}/suspend"), json!({})).await;
    expected.push(Invalidation::new(Subscription, &sid));
    app.admin_post(&format!("/api/v1/subscriptions/{sid}/reactivate"), json!({})).await;
    expected.push(Invalidation::new(Subscription, &sid));
    app.admin_post(
        "/api/v1/models",
        json!({"id": "inv-r", "input_cost_per_token": 0, "output_cost_per_token": 0, "restricted": true}),
    )
    .await;
    expected.push(Invalidation::new(Model, "inv-r"));
    let token = user_token("inv-user", "inv@example.com", &["user"]);
    let (_, pending) = app.post("/api/v1/subscriptions", &token, json!({"model_id": "inv-r"})).await;
    let pid = id(&pending);
    expected.push(Invalidation::new(User, &uid));
    app.admin_post(&format!("/api/v1/subscriptions/{pid}/approve"), json!({})).await;
    expected.push(Invalidation::new(Subscription, &pid));
    let team = app.admin_post("/api/v1/teams", json!({"name": "inv-team"})).await;
    let tid = id(&team);
    app.patch(&format!("/api/v1/teams/{tid}"), &admin, json!({"allowed_models": ["inv-m"]})).await;
    expected.push(Invalidation::new(Team, &tid));
    app.admin_post(&format!("/api/v1/teams/{tid}/members"), json!({"user_id": uid})).await;
    expected.push(Invalidation::new(Team, &tid));
    app.delete(&format!("/api/v1/teams/{tid}/members/{uid}"), &admin).await;
    expected.push(Invalidation::new(Team, &tid));
    app.delete(&format!("/api/v1/teams/{tid}"), &admin).await;
    expected.push(Invalidation::new(Team, &tid));
    let key = app.create_key(&uid, &["inv-m"]).await;
    let kid = id(&key);
    app.patch(&format!("/api/v1/keys/{kid}"), &admin, json!({"name": "renamed"})).await;
    expected.push(Invalidation::new(Key, &kid));
    app.admin_post(&format!("/api/v1/keys/{kid}/rotate"), json!({})).await;
    expected.push(Invalidation::new(Key, &kid));
    app.admin_post(&format!("/api/v1/keys/{kid}/revoke"), json!({})).await;
    expected.push(Invalidation::new(Key, &kid));
    app.admin_post(&format!("/api/v1/subscriptions/{sid}/cancel"), json!({})).await;
    expected.push(Invalidation::new(Subscription, &sid));
    app.admin_post("/api/v1/models/sync", json!({})).await;
    expected.push(Invalidation::new(Model, "granite-3-8b"));
    app.admin_post("/api/v1/models", json!({"id": "gone", "input_cost_per_token": 0, "output_cost_per_token": 0}))
        .await;
    app.delete("/api/v1/models/gone", &admin).await;
    expected.push(Invalidation::new(Model, "gone"));
    expected.push(Invalidation::new(Model, "gone"));

    // Other tests share this Redis: keep only messages about this test's entities.
    let ours: Vec<String> = expected.iter().map(|m| m.id.clone()).collect();
    let mut received: Vec<Invalidation> = Vec::new();
    let mut stream = pubsub.on_message();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, stream.next()).await else { break };
        let payload: String = msg.get_payload().unwrap();
        let m: Invalidation = serde_json::from_str(&payload).unwrap();
        if ours.contains(&m.id) {
            received.push(m);
        }
        if expected
            .iter()
            .all(|e| received.iter().filter(|r| *r == e).count() >= expected.iter().filter(|x| *x == e).count())
        {
            break;
        }
    }
    for e in &expected {
        let want = expected.iter().filter(|x| *x == e).count();
        let got = received.iter().filter(|r| *r == e).count();
        assert!(got >= want, "expected {want}x {e:?}, got {got}; received {received:?}");
    }
}
