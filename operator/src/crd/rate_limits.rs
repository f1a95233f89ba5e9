//! The API gateway's rate limits.
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The gateway's rate limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsSpec {
    /// The policies, each with a unique name; a request must pass every policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub policies: Vec<RateLimitPolicy>,
}

/// One token-bucket rate limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicy {
    /// The policy's name, unique in the stack (lower-case letters, digits and `-`); it is
    /// part of the Redis key of the limit's state.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// What is limited: each `user` (JWT subject), `client` (client id), `ip` or `route`.
    pub key: RateLimitKey,
    /// How many requests are allowed per `period` (at least 1).
    #[schemars(range(min = 1))]
    pub rate: i32,
    /// The period `rate` counts over.
    #[serde(default)]
    pub period: RatePeriod,
    /// How many requests may arrive at once (the bucket's size, at least 1); the gateway
    /// advertises it as `q` of `RateLimit-Policy`, over the seconds it takes to refill at
    /// `rate`. Unset: equal to `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<i32>,
}

/// What a rate limit counts requests by.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitKey {
    /// The authenticated user (the JWT's `sub`).
    User,
    /// The calling client (the JWT's client id).
    Client,
    /// The client's IP address.
    Ip,
    /// The route template, for all callers together.
    Route,
}

/// The period a rate counts over.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum RatePeriod {
    /// Per second.
    #[default]
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
}
