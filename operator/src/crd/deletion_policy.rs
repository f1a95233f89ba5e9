//! What happens to a stack's topics and credentials when it is deleted.
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// What the operator does with external state when the stack is deleted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeletionPolicy {
    /// The stack's Kafka topics (and the data in them). Default `Retain`.
    #[serde(default = "Retention::retain")]
    pub topics: Retention,
    /// The stack's Redis ACL user and PostgreSQL role. Default `Delete`.
    #[serde(default = "Retention::delete")]
    pub credentials: Retention,
}

impl Default for DeletionPolicy {
    fn default() -> Self {
        Self {
            topics: Retention::Retain,
            credentials: Retention::Delete,
        }
    }
}

/// Keep or remove something when the stack is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Retention {
    /// Leave it in place.
    Retain,
    /// Remove it.
    Delete,
}

impl Retention {
    fn retain() -> Self {
        Self::Retain
    }

    fn delete() -> Self {
        Self::Delete
    }
}
