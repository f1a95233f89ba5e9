//! The stack's status conditions: one per stage plus `Ready`. Pure: the controller hands in
//! what each stage reported and the clock; [`merge`] keeps a condition's
//! `lastTransitionTime` unless its status really changed, so an unchanged stack produces an
//! identical status (and the controller writes nothing).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Kafka, Redis and PostgreSQL answer with the admin credentials.
pub const DEPENDENCIES_READY: &str = "DependenciesReady";
/// The topics exist as requested.
pub const TOPICS_READY: &str = "TopicsReady";
/// The Redis ACL user, the PostgreSQL role and database, and their Secrets exist.
pub const CREDENTIALS_READY: &str = "CredentialsReady";
/// The command service, processor and cache updater are Available.
pub const CORE_AVAILABLE: &str = "CoreAvailable";
/// The WebSocket hub and the API gateway are Available.
pub const EDGE_AVAILABLE: &str = "EdgeAvailable";
/// Every stage is healthy.
pub const READY: &str = "Ready";

/// The stage conditions, in order (`Ready` comes last).
pub const STAGES: [&str; 5] = [
    DEPENDENCIES_READY,
    TOPICS_READY,
    CREDENTIALS_READY,
    CORE_AVAILABLE,
    EDGE_AVAILABLE,
];

/// `True`, `False` or `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The stage is healthy.
    True,
    /// The stage failed or is not healthy yet.
    False,
    /// The stage was not evaluated (an earlier one is not healthy, or the stack is paused).
    Unknown,
}

impl Status {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// What one stage reported in this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The condition type.
    pub type_: &'static str,
    /// Its status.
    pub status: Status,
    /// A `PascalCase` reason.
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
}

impl Report {
    /// A report.
    pub fn new(
        type_: &'static str,
        status: Status,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// A condition whose status changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The condition type.
    pub type_: String,
    /// The status before (`None`: the condition is new).
    pub from: Option<String>,
    /// The new condition.
    pub to: Condition,
}

/// Reasons of a stage that is on its way, not failing: waiting for an earlier stage, or its
/// Deployments rolling out.
pub const PROGRESS_REASONS: [&str; 2] = ["Waiting", "Progressing"];

impl Transition {
    /// Whether the transition is news for `kubectl describe`: a condition turning `True`, a
    /// failure, or a condition that was `True` no longer being so. A stage that starts out
    /// waiting or rolling out (`Unknown`, or `False` for a progress reason, after nothing or
    /// `Unknown`) only says what every new stack goes through, and gets no Event.
    pub fn is_news(&self) -> bool {
        match self.to.status.as_str() {
            "True" => true,
            "Unknown" => self.from.as_deref() == Some("True"),
            _ => {
                self.from.as_deref() == Some("True")
                    || !PROGRESS_REASONS.contains(&self.to.reason.as_str())
            }
        }
    }
}

/// The stage reports plus `Ready`, derived: `True` when every stage is, else `False` with
/// the first unhealthy stage's reason and message.
pub fn with_ready(stages: Vec<Report>) -> Vec<Report> {
    let blocker = stages.iter().find(|r| r.status != Status::True).cloned();
    let ready = match blocker {
        None => Report::new(
            READY,
            Status::True,
            "AllStagesReady",
            "every stage is healthy",
        ),
        Some(r) => Report::new(
            READY,
            Status::False,
            r.reason.clone(),
            format!("{}: {}", r.type_, r.message),
        ),
    };
    let mut all = stages;
    all.push(ready);
    all
}

/// The new conditions from `reports`, keeping `lastTransitionTime` of every condition whose
/// status did not change; plus the transitions. Conditions not reported are kept as they were.
pub fn merge(
    existing: &[Condition],
    reports: &[Report],
    generation: Option<i64>,
    now: &Time,
) -> (Vec<Condition>, Vec<Transition>) {
    let mut conditions = Vec::with_capacity(reports.len());
    let mut transitions = Vec::new();
    for report in reports {
        let previous = existing.iter().find(|c| c.type_ == report.type_);
        let status = report.status.as_str();
        let last_transition_time = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        let condition = Condition {
            type_: report.type_.to_owned(),
            status: status.to_owned(),
            reason: report.reason.clone(),
            message: report.message.clone(),
            last_transition_time,
            observed_generation: generation,
        };
        if previous.is_none_or(|p| p.status != status) {
            transitions.push(Transition {
                type_: report.type_.to_owned(),
                from: previous.map(|p| p.status.clone()),
                to: condition.clone(),
            });
        }
        conditions.push(condition);
    }
    for condition in existing {
        if !reports.iter().any(|r| r.type_ == condition.type_) {
            conditions.push(condition.clone());
        }
    }
    (conditions, transitions)
}

#[cfg(test)]
mod tests;
