//! A service's ConfigMap: its plain (non-secret) settings, by the variable names of
//! ARCHITECTURE.md, read by its pods through `envFrom`.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{Ca, Component, SHUTDOWN_GRACE_SECONDS, fingerprint, metadata, object_name};
use crate::crd::{RateLimitPolicy, ServicePrincipal};
use crate::validate::ValidatedStack;

/// The plain settings of a service, by the variable names of ARCHITECTURE.md.
pub fn settings(stack: &ValidatedStack, component: Component) -> BTreeMap<String, String> {
    let spec = stack.spec();
    let mut env = BTreeMap::new();
    let mut set = |key: &str, value: String| {
        env.insert(key.to_owned(), value);
    };
    set("PORT", component.port().to_string());
    set("OPS_PORT", super::OPS_PORT.to_string());
    set("BIND_ADDRESS", "0.0.0.0".to_owned());
    set("LOG_FORMAT", "json".to_owned());
    set("RUST_LOG", "info".to_owned());
    set("SHUTDOWN_GRACE_SECONDS", SHUTDOWN_GRACE_SECONDS.to_string());
    set("OTEL_SERVICE_NAME", component.name().to_owned());
    set(
        "OTEL_TRACES_SAMPLER_ARG",
        spec.telemetry.sampling_ratio.to_string(),
    );
    if let Some(endpoint) = &spec.telemetry.otlp_endpoint {
        set("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone());
    }
    if component.uses_kafka() {
        set(
            "KAFKA_BOOTSTRAP_SERVERS",
            spec.kafka.bootstrap_servers.clone(),
        );
        set("KAFKA_TOPIC_PREFIX", stack.topic_prefix());
        let sasl = stack.kafka_principal() == ServicePrincipal::Stack;
        let tls = spec.kafka.tls.as_ref();
        let protocol = crate::provision::kafka::security_protocol(sasl, tls.is_some());
        // Plaintext is the services' default: left out, so the ConfigMaps of stacks that use
        // it did not change (and their pods did not roll) when the setting appeared.
        if protocol != "plaintext" {
            set("KAFKA_SECURITY_PROTOCOL", protocol.to_owned());
        }
        if sasl {
            set(
                "KAFKA_SASL_MECHANISM",
                crate::provision::kafka::STACK_MECHANISM.to_owned(),
            );
        }
    }
    if component.uses_redis() {
        set("REDIS_KEY_PREFIX", stack.redis_key_prefix());
        // One Redis is the services' default: left out, so the ConfigMaps of stacks on one did
        // not change (and their pods did not roll) when the setting appeared.
        if spec.redis.cluster {
            set("REDIS_CLUSTER", "true".to_owned());
        }
    }
    // The CAs mounted into the pods (`ca::volumes`), where a variable points at them.
    for ca in Ca::ALL {
        if let Some(variable) = ca.variable()
            && ca.mounted_by(stack, component).is_some()
        {
            set(variable, ca.path());
        }
    }
    if component.verifies_tokens()
        && let Some(auth) = &spec.auth
    {
        // The JWT settings the token-verifying services share (`common::auth`); the HMAC secret itself
        // comes from a Secret ref in the Deployment, never from the ConfigMap.
        set("JWT_ISSUER", auth.issuer.clone());
        set("JWT_AUDIENCE", auth.audience.clone());
        if let Some(url) = &auth.jwks_url {
            set("JWT_JWKS_URL", url.clone());
        }
    }
    if component == Component::CacheUpdater {
        // The cache updater writes the rooms' history the hub resumes clients from: its size
        // and lifetime follow the hub's (set through the hub's `env`) unless the cache
        // updater's own `env` says otherwise (it is applied after these).
        for (hub, cache) in [
            ("HUB_HISTORY_SIZE", "CACHE_ROOM_HISTORY_SIZE"),
            ("HUB_HISTORY_TTL_SECONDS", "CACHE_ROOM_HISTORY_TTL_SECONDS"),
        ] {
            if let Some(value) = spec
                .services
                .hub
                .env
                .iter()
                .find(|e| e.name == hub && e.value_from.is_none())
                .and_then(|e| e.value.clone())
            {
                set(cache, value);
            }
        }
    }
    if component == Component::Gateway {
        // Gateway-specific settings (prefix `GATEWAY_`, ARCHITECTURE.md).
        set(
            "GATEWAY_COMMAND_SERVICE_URL",
            service_url(stack, Component::CommandService),
        );
        set("GATEWAY_HUB_URL", service_url(stack, Component::WsHub));
        if !spec.rate_limits.policies.is_empty() {
            set(
                "GATEWAY_RATE_LIMITS",
                rate_limits_json(&spec.rate_limits.policies),
            );
        }
    }
    env
}

/// The in-cluster base URL of a service of the stack: `http://<stack>-<service>.<ns>.svc:<port>`.
pub fn service_url(stack: &ValidatedStack, component: Component) -> String {
    format!(
        "http://{}.{}.svc:{}",
        object_name(stack, component),
        stack.namespace(),
        component.port()
    )
}

/// The rate-limit policies as compact JSON, with `burst` filled in (default: `rate`).
fn rate_limits_json(policies: &[RateLimitPolicy]) -> String {
    let policies: Vec<serde_json::Value> = policies
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "key": p.key,
                "rate": p.rate,
                "period": p.period,
                "burst": p.burst.unwrap_or(p.rate),
            })
        })
        .collect();
    serde_json::Value::Array(policies).to_string()
}

pub(super) fn config_map(stack: &ValidatedStack, component: Component) -> ConfigMap {
    ConfigMap {
        metadata: metadata(stack, component),
        data: Some(settings(stack, component)),
        ..ConfigMap::default()
    }
}

/// The fingerprint of the ConfigMap's data (keys and values, in order).
pub(super) fn config_hash(config_map: &ConfigMap) -> String {
    fingerprint(
        config_map
            .data
            .iter()
            .flatten()
            .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()]),
    )
}
