//! The change-propagation message: the control API publishes `{kind, id}` on
//! [`INVALIDATION_CHANNEL`] after each commit that changes what the gateway enforces, and every
//! gateway drops the matching cache entry.

use serde::{Deserialize, Serialize};

pub const INVALIDATION_CHANNEL: &str = "tollgate:invalidate";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidationKind {
    Key,
    User,
    Team,
    Subscription,
    Model,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Invalidation {
    pub kind: InvalidationKind,
    pub id: String,
}

/// The one Redis node to PUBLISH or SUBSCRIBE on. Classic pub/sub on a Redis Cluster is
/// broadcast to every node, so a cluster URL list (comma-separated, or `redis+cluster://`) is
/// reduced to its first node.
pub fn pubsub_node_url(url: &str) -> String {
    let first = url.split(',').next().unwrap_or(url).trim();
    match first.strip_prefix("redis+cluster://") {
        Some(rest) => format!("redis://{rest}"),
        None => first.to_string(),
    }
}

impl Invalidation {
    pub fn new(kind: InvalidationKind, id: impl ToString) -> Self {
        Self { kind, id: id.to_string() }
    }

    pub fn to_json(&self) -> String {
        // A unit enum and a string: serializing cannot fail.
        #[allow(clippy::expect_used)]
        serde_json::to_string(self).expect("invalidation serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_reduce_to_first_node() {
        assert_eq!(pubsub_node_url("redis://a:1"), "redis://a:1");
        assert_eq!(pubsub_node_url("redis://a:1, redis://b:2"), "redis://a:1");
        assert_eq!(pubsub_node_url("redis+cluster://a:1,b:2"), "redis://a:1");
    }

    #[test]
    fn wire_format() {
        let m = Invalidation::new(InvalidationKind::Key, "abc");
        assert_eq!(m.to_json(), r#"{"kind":"key","id":"abc"}"#);
        let back: Invalidation = serde_json::from_str(r#"{"kind":"model","id":"gpt"}"#).unwrap();
        assert_eq!(back, Invalidation::new(InvalidationKind::Model, "gpt"));
    }
}
