//! What happens to a stack's topics, database and credentials when it is deleted.
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// What the operator does with external state when the stack is deleted. What users store is
/// kept unless asked otherwise; the operator never deletes Redis keys.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeletionPolicy {
    /// The stack's Kafka topics and the records in them (commands, events, cache
    /// invalidations, dead letters). Default `Retain`; `Delete` deletes the four topics.
    #[serde(default = "Retention::retain")]
    pub topics: Retention,
    /// The stack's PostgreSQL database: the write model (documents, commands and their
    /// status, idempotency keys, the outbox). Default `Retain`, together with the role that owns
    /// it; `Delete` drops the database, disconnecting its sessions.
    #[serde(default = "Retention::retain")]
    pub database: Retention,
    /// The stack's logins: its Redis ACL user and its PostgreSQL login roles. Default
    /// `Delete`. With the database retained, its owner role stays but can no longer log in (no
    /// password); a stack of the same name created later logs in as it again and finds the
    /// data. Deleting logins deletes no data.
    #[serde(default = "Retention::delete")]
    pub credentials: Retention,
}

impl Default for DeletionPolicy {
    fn default() -> Self {
        Self {
            topics: Retention::Retain,
            database: Retention::Retain,
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
