//! Which reconcile steps may proceed, given what was observed: a pure function of the
//! observed health, so the staging rules are unit-tested without a cluster.
//!
//! The order is fixed: dependencies → topics → credentials → core services (command service,
//! processor, cache updater) → WebSocket hub → API gateway. A step proceeds only when every
//! step before it is healthy; the gateway therefore starts only after the core is Available
//! (and the hub with it). A paused stack proceeds with nothing.
use std::collections::BTreeSet;

use crate::build::{Component, Tier};

/// One step of the staged reconcile, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// Kafka, Redis and PostgreSQL answer with the admin credentials.
    Dependencies,
    /// The stack's topics exist as requested.
    Topics,
    /// The stack's Redis ACL user, PostgreSQL role and connection Secrets exist.
    Credentials,
    /// The command service, processor and cache updater are applied and Available.
    Core,
    /// The WebSocket hub is applied and Available.
    WsHub,
    /// The API gateway is applied and Available.
    Gateway,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Self; 6] = [
        Self::Dependencies,
        Self::Topics,
        Self::Credentials,
        Self::Core,
        Self::WsHub,
        Self::Gateway,
    ];
}

/// What the *dereference* and *status* steps observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Kafka's metadata request, Redis's `PING` and PostgreSQL's `SELECT 1` all succeeded.
    pub dependencies_reachable: bool,
    /// Every topic exists with the requested partitions and configuration.
    pub topics_reconciled: bool,
    /// The ACL user, the role and their Secrets exist.
    pub credentials_provisioned: bool,
    /// The services whose Deployment reports `Available=True`.
    pub available: BTreeSet<Component>,
}

/// What a step may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Apply the step's changes.
    Proceed,
    /// Wait: this earlier step is not healthy yet.
    WaitFor(Step),
    /// `spec.paused` is true: change nothing.
    Paused,
}

/// Whether `step` is healthy. A service that is not enabled has nothing to wait for.
pub fn healthy(step: Step, enabled: &BTreeSet<Component>, observed: &Observed) -> bool {
    let available = |c: &Component| !enabled.contains(c) || observed.available.contains(c);
    match step {
        Step::Dependencies => observed.dependencies_reachable,
        Step::Topics => observed.topics_reconciled,
        Step::Credentials => observed.credentials_provisioned,
        Step::Core => Component::ALL
            .iter()
            .filter(|c| c.tier() == Tier::Core)
            .all(available),
        Step::WsHub => available(&Component::WsHub),
        Step::Gateway => available(&Component::Gateway),
    }
}

/// The decision for every step, in order.
pub fn plan(
    enabled: &BTreeSet<Component>,
    observed: &Observed,
    paused: bool,
) -> Vec<(Step, Decision)> {
    let mut blocker = None;
    Step::ALL
        .into_iter()
        .map(|step| {
            let decision = match (paused, blocker) {
                (true, _) => Decision::Paused,
                (false, Some(earlier)) => Decision::WaitFor(earlier),
                (false, None) => Decision::Proceed,
            };
            if blocker.is_none() && !healthy(step, enabled, observed) {
                blocker = Some(step);
            }
            (step, decision)
        })
        .collect()
}

#[cfg(test)]
mod tests;
