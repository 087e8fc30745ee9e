//! Listens on `tollgate:invalidate` and drops what each message names: keys, users, teams and
//! subscriptions from the [`KeyCache`], models by reloading them into the catalogue. After any
//! (re)connection the whole key cache is dropped, since messages may have been missed meanwhile.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use sqlx::PgPool;
use tollgate_core::invalidation::{pubsub_node_url, Invalidation, InvalidationKind, INVALIDATION_CHANNEL};

use crate::{catalog::ModelCatalog, key_cache::KeyCache, metrics::Metrics};

pub struct Invalidator {
    pub keys: Arc<KeyCache>,
    pub catalog: Arc<ModelCatalog>,
    pub db: PgPool,
    pub metrics: Arc<Metrics>,
}

impl Invalidator {
    pub fn apply(&self, message: &Invalidation) {
        let kind = match message.kind {
            InvalidationKind::Key => "key",
            InvalidationKind::User => "user",
            InvalidationKind::Team => "team",
            InvalidationKind::Subscription => "subscription",
            InvalidationKind::Model => "model",
        };
        if message.kind == InvalidationKind::Model {
            let (catalog, db, id) = (self.catalog.clone(), self.db.clone(), message.id.clone());
            tokio::spawn(async move {
                if let Err(e) = catalog.reload_one(&db, &id).await {
                    tracing::warn!(error = %e, "model reload failed");
                }
            });
        } else {
            self.keys.invalidate(message);
        }
        // Counted once applied, so that a reader of the metric knows the cache has moved on.
        self.metrics.invalidations.with_label_values(&[kind]).inc();
    }

    /// Runs forever: subscribe, apply messages, and on any failure reconnect after a pause.
    pub async fn run(self, redis_url: String) {
        let url = pubsub_node_url(&redis_url);
        loop {
            match self.listen_once(&url).await {
                Ok(()) => tracing::warn!("invalidation stream ended; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "invalidation listener failed; reconnecting"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn listen_once(&self, url: &str) -> redis::RedisResult<()> {
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(INVALIDATION_CHANNEL).await?;
        // Whatever was published while we were not listening is unknown: start clean.
        self.keys.clear();
        if let Err(e) = self.catalog.reload_all(&self.db).await {
            tracing::warn!(error = %e, "model catalogue reload failed");
        }
        tracing::info!("listening for invalidations");
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else { continue };
            match serde_json::from_str::<Invalidation>(&payload) {
                Ok(m) => self.apply(&m),
                Err(e) => tracing::warn!(error = %e, "unreadable invalidation message"),
            }
        }
        Ok(())
    }
}
