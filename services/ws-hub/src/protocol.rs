//! The wire protocol: what clients send, what the hub answers, in JSON text frames or
//! MessagePack binary frames (the README documents it for client authors).
//!
//! Every message is a map with a `type`. A client frame is decoded by its kind (text → JSON,
//! binary → MessagePack), whatever the connection's encoding; the hub answers in the
//! connection's encoding, chosen at upgrade time (subprotocol `meridian.v1.msgpack` or
//! `meridian.v1.json`, else `?encoding=msgpack|json`, else JSON).
//!
//! Payloads are bytes. In MessagePack frames `data` is a `bin`, byte for byte as published.
//! In JSON frames `data` is the payload's JSON value when the payload is JSON, otherwise the
//! frame carries `dataBase64` (standard alphabet, padded) instead.

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes};
use base64::Engine as _;
use common::rooms::{Position, Publication};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// The JSON subprotocol.
pub const PROTOCOL_JSON: &str = "meridian.v1.json";
/// The MessagePack subprotocol.
pub const PROTOCOL_MSGPACK: &str = "meridian.v1.msgpack";
/// A `Sec-WebSocket-Protocol` entry carrying the access token: `bearer.<jwt>`.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// How the hub encodes the frames it sends on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JSON text frames.
    Json,
    /// MessagePack binary frames (maps with named fields).
    MessagePack,
}

/// Where to resume a room from: the last publication the client saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recover {
    /// The epoch the client saw.
    pub epoch: String,
    /// The offset of the last publication the client received.
    pub offset: u64,
}

impl From<Recover> for Position {
    fn from(r: Recover) -> Self {
        Self {
            epoch: r.epoch,
            offset: r.offset,
        }
    }
}

/// A client message, generic over how `data` arrives (a JSON value, or MessagePack bytes).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Wire<D> {
    Subscribe {
        room: String,
        #[serde(default)]
        recover: Option<Recover>,
        #[serde(default, rename = "ref")]
        reference: Option<u64>,
    },
    Unsubscribe {
        room: String,
        #[serde(default, rename = "ref")]
        reference: Option<u64>,
    },
    Publish {
        room: String,
        data: D,
        #[serde(default, rename = "ref")]
        reference: Option<u64>,
    },
}

/// A decoded client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Join a room, optionally resuming after a known position.
    Subscribe {
        /// The room.
        room: String,
        /// Resume after this position.
        recover: Option<Recover>,
        /// Echoed in the answer.
        reference: Option<u64>,
    },
    /// Leave a room.
    Unsubscribe {
        /// The room.
        room: String,
        /// Echoed in the answer.
        reference: Option<u64>,
    },
    /// Publish to a room.
    Publish {
        /// The room.
        room: String,
        /// The payload bytes (a JSON client's `data` serialised as JSON).
        payload: Bytes,
        /// Echoed in the answer.
        reference: Option<u64>,
    },
}

impl<D> Wire<D> {
    fn into_request(
        self,
        payload: impl FnOnce(D) -> Result<Bytes, String>,
    ) -> Result<Request, String> {
        Ok(match self {
            Self::Subscribe {
                room,
                recover,
                reference,
            } => Request::Subscribe {
                room,
                recover,
                reference,
            },
            Self::Unsubscribe { room, reference } => Request::Unsubscribe { room, reference },
            Self::Publish {
                room,
                data,
                reference,
            } => Request::Publish {
                room,
                payload: payload(data)?,
                reference,
            },
        })
    }
}

impl Request {
    /// Decodes a JSON text frame.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let wire: Wire<serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON message: {e}"))?;
        wire.into_request(|data| {
            serde_json::to_vec(&data)
                .map(Bytes::from)
                .map_err(|e| e.to_string())
        })
    }

    /// Decodes a MessagePack binary frame (`data` must be `bin` or `str`).
    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, String> {
        let wire: Wire<serde_bytes::ByteBuf> = rmp_serde::from_slice(bytes)
            .map_err(|e| format!("invalid MessagePack message: {e}"))?;
        wire.into_request(|data| Ok(Bytes::from(data.into_vec())))
    }

    /// The room the request is about.
    pub fn room(&self) -> &str {
        match self {
            Self::Subscribe { room, .. }
            | Self::Unsubscribe { room, .. }
            | Self::Publish { room, .. } => room,
        }
    }

    /// The client's reference, echoed in answers and errors.
    pub fn reference(&self) -> Option<u64> {
        match self {
            Self::Subscribe { reference, .. }
            | Self::Unsubscribe { reference, .. }
            | Self::Publish { reference, .. } => *reference,
        }
    }
}

/// One publication in a frame (pushed, or listed in `subscribed`): `room`, `epoch`,
/// `offset`, `data` (bin, or a JSON value) or `dataBase64`, and `traceparent` when the
/// connection asked for trace context and the publisher had a trace.
struct PublicationOut<'a> {
    room: &'a str,
    publication: &'a Publication,
    encoding: Encoding,
    trace_context: bool,
}

impl<'a> PublicationOut<'a> {
    fn new(
        room: &'a str,
        publication: &'a Publication,
        encoding: Encoding,
        trace_context: bool,
    ) -> Self {
        Self {
            room,
            publication,
            encoding,
            trace_context,
        }
    }
}

impl Serialize for PublicationOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let trace_parent = self
            .publication
            .trace_parent
            .as_deref()
            .filter(|_| self.trace_context);
        let mut map = serializer.serialize_map(Some(4 + usize::from(trace_parent.is_some())))?;
        map.serialize_entry("room", self.room)?;
        map.serialize_entry("epoch", &self.publication.epoch)?;
        map.serialize_entry("offset", &self.publication.offset)?;
        if let Some(trace_parent) = trace_parent {
            map.serialize_entry("traceparent", trace_parent)?;
        }
        let payload = &self.publication.payload[..];
        match self.encoding {
            Encoding::MessagePack => {
                map.serialize_entry("data", serde_bytes::Bytes::new(payload))?;
            }
            Encoding::Json => match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(value) => map.serialize_entry("data", &value)?,
                Err(_) => map.serialize_entry(
                    "dataBase64",
                    &base64::engine::general_purpose::STANDARD.encode(payload),
                )?,
            },
        }
        map.end()
    }
}

/// Everything the hub sends.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerMessage<'a> {
    Subscribed {
        room: &'a str,
        epoch: &'a str,
        offset: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        publications: Vec<PublicationOut<'a>>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<u64>,
    },
    Unsubscribed {
        room: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<u64>,
    },
    Published {
        room: &'a str,
        epoch: &'a str,
        offset: u64,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<u64>,
    },
    Publication(PublicationOut<'a>),
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<u64>,
    },
    #[serde(rename_all = "camelCase")]
    Reconnect {
        reason: &'a str,
        delay_ms: u64,
    },
}

fn encode(message: &ServerMessage<'_>, encoding: Encoding) -> Message {
    // `encoding` also decided how payloads inside `message` are represented.
    match encoding {
        // Serialising these types cannot fail (string keys, no maps with non-string keys).
        Encoding::Json => Message::Text(Utf8Bytes::from(
            serde_json::to_string(message).unwrap_or_default(),
        )),
        Encoding::MessagePack => Message::Binary(Bytes::from(
            rmp_serde::to_vec_named(message).unwrap_or_default(),
        )),
    }
}

/// An answer to one client request (or an error not tied to a publication).
#[derive(Debug)]
pub enum Reply {
    /// The client joined the room.
    Subscribed {
        /// The room.
        room: Arc<str>,
        /// The room's position when the client joined.
        position: Position,
        /// `Some(recovered)` when the client asked to resume.
        recovered: Option<bool>,
        /// The publications it missed (empty unless recovered).
        publications: Vec<Publication>,
        /// The client's reference.
        reference: Option<u64>,
    },
    /// The client left the room.
    Unsubscribed {
        /// The room.
        room: Arc<str>,
        /// The client's reference.
        reference: Option<u64>,
    },
    /// The client's publication was stored and sent.
    Published {
        /// The room.
        room: String,
        /// Where it was stored.
        position: Position,
        /// The client's reference.
        reference: Option<u64>,
    },
    /// A request was refused.
    Error {
        /// Stable machine-readable code (see the README).
        code: &'static str,
        /// A human-readable explanation, safe to show.
        message: String,
        /// The room concerned, if any.
        room: Option<String>,
        /// The client's reference.
        reference: Option<u64>,
    },
}

impl Reply {
    /// The frame for this answer (`trace_context`: listed publications carry their
    /// `traceparent`).
    pub fn encode(&self, encoding: Encoding, trace_context: bool) -> Message {
        let message = match self {
            Self::Subscribed {
                room,
                position,
                recovered,
                publications,
                reference,
            } => ServerMessage::Subscribed {
                room,
                epoch: &position.epoch,
                offset: position.offset,
                recovered: *recovered,
                publications: publications
                    .iter()
                    .map(|p| PublicationOut::new(room, p, encoding, trace_context))
                    .collect(),
                reference: *reference,
            },
            Self::Unsubscribed { room, reference } => ServerMessage::Unsubscribed {
                room,
                reference: *reference,
            },
            Self::Published {
                room,
                position,
                reference,
            } => ServerMessage::Published {
                room,
                epoch: &position.epoch,
                offset: position.offset,
                reference: *reference,
            },
            Self::Error {
                code,
                message,
                room,
                reference,
            } => ServerMessage::Error {
                code,
                message,
                room: room.as_deref(),
                reference: *reference,
            },
        };
        encode(&message, encoding)
    }
}

/// The drain notice sent before closing with 1012: reconnect (to another replica) after
/// `delay_ms`, jittered so that clients do not all return at once.
pub fn reconnect_notice(delay_ms: u64, encoding: Encoding) -> Message {
    encode(
        &ServerMessage::Reconnect {
            reason: "draining",
            delay_ms,
        },
        encoding,
    )
}

/// A publication on its way to local subscribers: encoded at most once per encoding (with and
/// without trace context) on this node, however many clients receive it.
#[derive(Debug)]
pub struct Delivery {
    /// The room.
    pub room: Arc<str>,
    /// The publication.
    pub publication: Publication,
    /// JSON, MessagePack, JSON with trace context, MessagePack with trace context.
    frames: [OnceLock<Message>; 4],
}

impl Delivery {
    /// A delivery of `publication` in `room`.
    pub fn new(room: Arc<str>, publication: Publication) -> Self {
        Self {
            room,
            publication,
            frames: Default::default(),
        }
    }

    /// The `publication` frame in `encoding`, with its `traceparent` when `trace_context` (a
    /// cheap clone after the first call).
    pub fn frame(&self, encoding: Encoding, trace_context: bool) -> Message {
        let slot = match encoding {
            Encoding::Json => 0,
            Encoding::MessagePack => 1,
        } + if trace_context { 2 } else { 0 };
        self.frames[slot]
            .get_or_init(|| {
                encode(
                    &ServerMessage::Publication(PublicationOut::new(
                        &self.room,
                        &self.publication,
                        encoding,
                        trace_context,
                    )),
                    encoding,
                )
            })
            .clone()
    }
}

#[cfg(test)]
mod tests;
