//! Publishes invalidations on Redis after a commit. A failed publish never fails the write that
//! caused it: the gateway's cache TTL is the backstop, and the failure is logged and counted.

use std::{sync::Arc, time::Duration};

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;
use tollgate_core::invalidation::{pubsub_node_url, Invalidation, INVALIDATION_CHANNEL};

const REDIS_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Clone)]
pub struct EventPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
}

impl EventPublisher {
    pub fn new(redis_url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(pubsub_node_url(redis_url))?;
        Ok(Self { inner: Arc::new(Inner { client, conn: Mutex::new(None) }) })
    }

    /// A live connection, made on first use; `None` if Redis cannot be reached in time.
    pub async fn connection(&self) -> Option<ConnectionManager> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Some(conn.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1);
        match tokio::time::timeout(REDIS_TIMEOUT, ConnectionManager::new_with_config(self.inner.client.clone(), config))
            .await
        {
            Ok(Ok(conn)) => {
                *slot = Some(conn.clone());
                Some(conn)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis unreachable");
                None
            }
            Err(_) => {
                tracing::warn!("redis connect timed out");
                None
            }
        }
    }

    pub async fn ping(&self) -> bool {
        let Some(mut conn) = self.connection().await else { return false };
        let ping = redis::cmd("PING");
        let pong = ping.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(REDIS_TIMEOUT, pong).await, Ok(Ok(_)))
    }

    /// Publishes each message; returns how many were delivered to Redis.
    pub async fn publish(&self, messages: &[Invalidation]) -> usize {
        if messages.is_empty() {
            return 0;
        }
        let Some(mut conn) = self.connection().await else { return 0 };
        let mut pipe = redis::pipe();
        for m in messages {
            pipe.cmd("PUBLISH").arg(INVALIDATION_CHANNEL).arg(m.to_json()).ignore();
        }
        match tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => messages.len(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, count = messages.len(), "invalidation publish failed");
                0
            }
            Err(_) => {
                tracing::warn!(count = messages.len(), "invalidation publish timed out");
                0
            }
        }
    }
}
