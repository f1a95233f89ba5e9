//! Who sets each Deployment's replica count ([`build::Replicas`]): the operator itself for the
//! consumers that scale on Kafka lag (their group's lag read through Kafka, the decision made
//! by [`crate::scaling`], each change an Event and a metric), and nobody but a
//! HorizontalPodAutoscaler the operator does not own, where one targets a service's
//! Deployment.
use std::collections::BTreeSet;
use std::time::Instant;

use kube::ResourceExt as _;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;

use super::status::event;
use super::{Context, dereference};
use crate::build::{self, Component, Replicas};
use crate::crd::MiddlewareStack;
use crate::names;
use crate::scaling::{self, Decision, Memory, Why};
use crate::validate::ValidatedStack;
use common::metrics::OPERATOR_SCALING_DECISIONS_TOTAL;

/// The replica counts the stages apply, and Events about the decisions that changed one.
pub(super) struct Scaling {
    pub(super) replicas: Replicas,
    pub(super) events: Vec<Event>,
}

/// What a consumer's scaler remembers between reconciles, per stack and service.
pub(super) type Memories =
    std::sync::Mutex<std::collections::HashMap<(ObjectRef<MiddlewareStack>, Component), Memory>>;

/// Decides the replica counts of `validated`'s services (see the module's documentation).
/// Reading a lag never fails the reconcile: the service keeps its count, and a Warning Event
/// says why.
pub(super) async fn replicas(
    ctx: &Context,
    stack: &MiddlewareStack,
    validated: &ValidatedStack,
    refs: &dereference::Dereferenced,
) -> Scaling {
    let mut scaling = Scaling {
        replicas: Replicas {
            external: external(ctx, validated),
            ..Replicas::default()
        },
        events: Vec::new(),
    };
    let key = ObjectRef::from_obj(stack);
    for component in Component::ALL {
        let Some(policy) = build::lag_policy(validated, component) else {
            forget(ctx, &key, component);
            continue;
        };
        let current = current(ctx, validated, component).unwrap_or(policy.min);
        let (Some(group), Some(consumes)) = (
            build::consumer_group(validated, component),
            component.consumes(),
        ) else {
            continue;
        };
        let topic = names::topic(validated, consumes.topic);
        let timeout = ctx.settings.dependency_timeout;
        let lag = match dereference::kafka(ctx, validated, refs) {
            Ok(kafka) => kafka.consumer_lag(&group, &topic, timeout).await,
            Err(error) => Err(error),
        };
        let lag = match lag {
            Ok(lag) => lag,
            Err(error) => {
                tracing::warn!(service = component.name(), %group, error = %error,
                    "Could not read the consumer lag; keeping the replica count.");
                scaling.replicas.decided.insert(component, current);
                scaling.events.push(event(
                    EventType::Warning,
                    "ScalingPaused",
                    "ReadConsumerLag",
                    format!(
                        "{} keeps {current} replicas: reading the lag of consumer group {group} \
                         failed: {error}",
                        component.name()
                    ),
                ));
                continue;
            }
        };
        let policy = scaling::LagPolicy {
            partitions: lag.partitions,
            ..policy
        };
        let memory = recall(ctx, &key, component);
        let (decision, memory) =
            scaling::decide(&policy, current, lag.messages, memory, Instant::now());
        remember(ctx, &key, component, memory);
        let to = match decision {
            Decision::Keep => current,
            Decision::Scale { to, why } => {
                let direction = if to > current { "up" } else { "down" };
                metrics::counter!(OPERATOR_SCALING_DECISIONS_TOTAL,
                    "service" => component.name(), "direction" => direction)
                .increment(1);
                let because = match why {
                    Why::LagHigh => "the lag needs more consumers".to_owned(),
                    Why::LagLow => format!(
                        "the lag fitted fewer consumers for {}s",
                        policy.scale_down_delay.as_secs()
                    ),
                    Why::Bounds => "the count was outside the autoscaling bounds".to_owned(),
                };
                let note = format!(
                    "{} {current} → {to} replicas: {because} (consumer group {group} is {} \
                     messages behind on {topic}; target {} per replica, between {} and {} \
                     replicas, {} partitions)",
                    component.name(),
                    lag.messages,
                    policy.target_lag_per_replica,
                    policy.min,
                    policy.ceiling(),
                    lag.partitions,
                );
                tracing::info!(stack = %stack.name_any(), service = component.name(),
                    from = current, to, lag = lag.messages, "Scaling a consumer on its lag.");
                let reason = if direction == "up" {
                    "ScaledUp"
                } else {
                    "ScaledDown"
                };
                scaling
                    .events
                    .push(event(EventType::Normal, reason, "Scale", note));
                to
            }
        };
        scaling.replicas.decided.insert(component, to);
    }
    scaling
}

/// The replica count of the service's Deployment, as the store holds it.
fn current(ctx: &Context, validated: &ValidatedStack, component: Component) -> Option<i32> {
    let name = build::object_name(validated, component);
    ctx.stores
        .deployments
        .get(&ObjectRef::new(&name).within(validated.namespace()))
        .map(|d| d.state.desired)
}

/// The services whose Deployment a HorizontalPodAutoscaler the operator does not own targets.
fn external(ctx: &Context, validated: &ValidatedStack) -> BTreeSet<Component> {
    let foreign = ctx.stores.foreign_autoscalers.state();
    Component::ALL
        .into_iter()
        .filter(|component| {
            let name = build::object_name(validated, *component);
            foreign.iter().any(|hpa| {
                hpa.metadata.namespace.as_deref() == Some(validated.namespace())
                    && hpa.spec.as_ref().is_some_and(|s| {
                        s.scale_target_ref.kind == "Deployment" && s.scale_target_ref.name == name
                    })
            })
        })
        .collect()
}

fn recall(ctx: &Context, key: &ObjectRef<MiddlewareStack>, component: Component) -> Memory {
    ctx.scalers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(key.clone(), component))
        .copied()
        .unwrap_or_default()
}

fn remember(ctx: &Context, key: &ObjectRef<MiddlewareStack>, component: Component, memory: Memory) {
    let mut scalers = ctx.scalers.lock().unwrap_or_else(|p| p.into_inner());
    if memory == Memory::default() {
        scalers.remove(&(key.clone(), component));
    } else {
        scalers.insert((key.clone(), component), memory);
    }
}

/// Forgets what the scaler remembered about a service (it no longer scales on lag).
fn forget(ctx: &Context, key: &ObjectRef<MiddlewareStack>, component: Component) {
    ctx.scalers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&(key.clone(), component));
}

/// Forgets everything about a deleted stack.
pub(super) fn forget_stack(ctx: &Context, key: &ObjectRef<MiddlewareStack>) {
    ctx.scalers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(stack, _), _| stack != key);
}
