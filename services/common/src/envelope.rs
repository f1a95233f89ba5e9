//! The JSON envelopes carried on the `commands` and `events` topics (ARCHITECTURE.md, "Kafka").
//! One definition for the producers (command service, processor) and the consumers
//! (processor, cache updater, and users' own consumers), so the wire format cannot drift.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A command as relayed to `commands` (key `collection/id`, header `message-type:
/// command.<type>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandEnvelope {
    /// The command's id (UUIDv7), also the `command-id` header.
    pub command_id: Uuid,
    /// `create`, `replace`, `patch`, `delete` or a configured custom type.
    #[serde(rename = "type")]
    pub command_type: String,
    /// The document's collection.
    pub collection: String,
    /// The document's id within its collection.
    pub id: String,
    /// Optimistic concurrency: the version the document must have for the command to apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<i64>,
    /// The command's payload (the document for `create`/`replace`, the merge patch for
    /// `patch`, absent for `delete`, anything for custom types).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// The client that sent it (JWT subject or API client id).
    pub client_id: String,
    /// When the command service accepted it.
    pub accepted_at: DateTime<Utc>,
}

/// The `type` of an event that removed its document; every other event type carries the
/// document's full state after the change in `data`.
pub const EVENT_DELETED: &str = "deleted";

/// A document change as emitted to `events` (key `collection/id`, header `message-type:
/// event.<type>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventEnvelope {
    /// The event's id (UUIDv7).
    pub event_id: Uuid,
    /// What happened: `created`, `replaced`, `patched`, [`EVENT_DELETED`], or a custom
    /// handler's event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The document's collection.
    pub collection: String,
    /// The document's id within its collection.
    pub id: String,
    /// The document's version after the change (1 for the first write, +1 per change).
    pub version: i64,
    /// The document's full state after the change; `null` for [`EVENT_DELETED`].
    pub data: Option<serde_json::Value>,
    /// The command that caused it.
    pub command_id: Uuid,
    /// When the processor committed the change.
    pub occurred_at: DateTime<Utc>,
}

impl EventEnvelope {
    /// Whether the event removed the document.
    pub fn is_delete(&self) -> bool {
        self.event_type == EVENT_DELETED
    }

    /// The Kafka key of every message about this document.
    pub fn key(&self) -> String {
        document_key(&self.collection, &self.id)
    }
}

/// `collection/id`: the Kafka key that keeps one document's messages in order.
pub fn document_key(collection: &str, id: &str) -> String {
    format!("{collection}/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_envelope_uses_the_documented_field_names() {
        let event = EventEnvelope {
            event_id: Uuid::nil(),
            event_type: "created".into(),
            collection: "books".into(),
            id: "b1".into(),
            version: 1,
            data: Some(serde_json::json!({"title": "Dune"})),
            command_id: Uuid::nil(),
            occurred_at: DateTime::from_timestamp(0, 0).unwrap_or_default(),
        };
        let json = serde_json::to_value(&event).unwrap();
        for field in [
            "eventId",
            "type",
            "collection",
            "id",
            "version",
            "data",
            "commandId",
            "occurredAt",
        ] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        assert_eq!(
            serde_json::from_value::<EventEnvelope>(json).unwrap(),
            event
        );
        assert_eq!(event.key(), "books/b1");
    }

    #[test]
    fn command_envelope_omits_an_absent_expected_version() {
        let json = serde_json::json!({
            "commandId": Uuid::nil(), "type": "delete", "collection": "books", "id": "b1",
            "clientId": "c", "acceptedAt": "2026-01-01T00:00:00Z"
        });
        let command: CommandEnvelope = serde_json::from_value(json).unwrap();
        assert_eq!(command.expected_version, None);
        assert_eq!(command.payload, None);
        assert!(
            serde_json::to_value(&command)
                .unwrap()
                .get("expectedVersion")
                .is_none()
        );
    }
}
