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

impl Invalidation {
    pub fn new(kind: InvalidationKind, id: impl ToString) -> Self {
        Self { kind, id: id.to_string() }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("invalidation serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let m = Invalidation::new(InvalidationKind::Key, "abc");
        assert_eq!(m.to_json(), r#"{"kind":"key","id":"abc"}"#);
        let back: Invalidation = serde_json::from_str(r#"{"kind":"model","id":"gpt"}"#).unwrap();
        assert_eq!(back, Invalidation::new(InvalidationKind::Model, "gpt"));
    }
}
