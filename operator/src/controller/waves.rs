//! Upgrade waves: when a new operator version would change what a stack runs, the stacks are
//! rolled onto it a few at a time (`ROLLOUT_CONCURRENCY`), each until its services have rolled
//! out (as `kubectl rollout status` sees it), instead of all at once (up to the reconcile concurrency) — so a bad release
//! stops at the first stacks it breaks.
//!
//! A stack is *due* when its status records another operator version than this one
//! (`status.operatorVersion`) and its spec did not change since its last reconcile: a spec
//! change is the user's and rolls at once (and records this version). A due stack waits in
//! arrival order for a slot; it holds the slot until every service has rolled out. One that
//! takes longer than `ROLLOUT_TIMEOUT_SECONDS` halts the wave: no other stack starts until it
//! has rolled out, is changed, paused or deleted. Paused stacks are never touched. The
//! state is the process's own: a restarted operator starts the waves over from the statuses.
use std::collections::HashMap;
use std::time::Instant;

use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;

use super::status::event;
use super::{Context, Settings};
use crate::crd::MiddlewareStack;

/// The waves' state.
#[derive(Default)]
pub(super) struct Waves {
    /// Stacks rolling onto this version now: since when, at which generation.
    rolling: HashMap<ObjectRef<MiddlewareStack>, (Instant, Option<i64>)>,
    /// Due stacks waiting for a slot, in arrival order.
    queue: Vec<ObjectRef<MiddlewareStack>>,
    /// The stack that did not roll out in time, which halts the wave.
    halted_by: Option<ObjectRef<MiddlewareStack>>,
}

/// Whether a stack's services may be written now.
pub(super) enum Turn {
    /// Yes: it is not due, or it has a slot (`Some`: the Event of its start).
    Go(Option<Event>),
    /// Not yet (`Some`: the Event of its queueing, the first time).
    Wait(Option<Event>),
}

/// Whether `stack` is due to be rolled onto this operator's version (see the module's
/// documentation).
pub(super) fn due(stack: &MiddlewareStack, settings: &Settings) -> bool {
    let Some(status) = &stack.status else {
        return false;
    };
    status.observed_generation.is_some()
        && status.observed_generation == stack.metadata.generation
        && status.operator_version.as_deref() != Some(settings.version.as_str())
}

/// Whether `stack` may roll out now.
pub(super) fn turn(ctx: &Context, stack: &MiddlewareStack) -> Turn {
    let key = ObjectRef::from_obj(stack);
    let due = due(stack, &ctx.settings);
    let mut waves = ctx.waves.lock().unwrap_or_else(|p| p.into_inner());
    let generation = stack.metadata.generation;
    if waves
        .rolling
        .get(&key)
        .is_some_and(|(_, at)| *at != generation)
    {
        // Changed by its user while rolling: that rollout is theirs, not the wave's.
        waves.rolling.remove(&key);
        if waves.halted_by.as_ref() == Some(&key) {
            waves.halted_by = None;
        }
    }
    if !due || waves.rolling.contains_key(&key) {
        waves.queue.retain(|k| k != &key);
        return Turn::Go(None);
    }
    let from = stack
        .status
        .as_ref()
        .and_then(|s| s.operator_version.clone())
        .unwrap_or_else(|| "an earlier version".to_owned());
    let version = &ctx.settings.version;
    let first = !waves.queue.contains(&key);
    if first {
        waves.queue.push(key.clone());
    }
    if let Some(halted_by) = &waves.halted_by {
        let note = format!(
            "waits to be rolled from operator {from} onto {version}: the wave is halted until \
             {halted_by} has rolled out"
        );
        return Turn::Wait(
            first.then(|| event(EventType::Normal, "UpgradeQueued", "Rollout", note)),
        );
    }
    let free = ctx
        .settings
        .rollout_concurrency
        .saturating_sub(waves.rolling.len());
    let position = waves.queue.iter().position(|k| k == &key).unwrap_or(0);
    if position < free {
        waves.queue.retain(|k| k != &key);
        waves.rolling.insert(key, (Instant::now(), generation));
        let note = format!(
            "rolling from operator {from} onto {version} ({} of ROLLOUT_CONCURRENCY {} in \
             progress)",
            waves.rolling.len(),
            ctx.settings.rollout_concurrency
        );
        return Turn::Go(Some(event(
            EventType::Normal,
            "UpgradeStarted",
            "Rollout",
            note,
        )));
    }
    let note = format!(
        "waits to be rolled from operator {from} onto {version}: {} stacks roll at once \
         (ROLLOUT_CONCURRENCY), {position} wait before it",
        ctx.settings.rollout_concurrency
    );
    Turn::Wait(first.then(|| event(EventType::Normal, "UpgradeQueued", "Rollout", note)))
}

/// After a rollout: frees the stack's slot once every service has `rolled_out` (no pod of an
/// older template left, every new one ready), or halts the wave when that has taken longer
/// than the rollout timeout. Returns the Event of either.
pub(super) fn observe(ctx: &Context, stack: &MiddlewareStack, rolled_out: bool) -> Option<Event> {
    let key = ObjectRef::from_obj(stack);
    let mut waves = ctx.waves.lock().unwrap_or_else(|p| p.into_inner());
    let (started, _) = *waves.rolling.get(&key)?;
    let version = &ctx.settings.version;
    if rolled_out {
        waves.rolling.remove(&key);
        let resumed = waves.halted_by.as_ref() == Some(&key);
        if resumed {
            waves.halted_by = None;
        }
        let note = format!(
            "rolled onto operator {version} in {}s{}",
            started.elapsed().as_secs(),
            if resumed { "; the wave resumes" } else { "" }
        );
        return Some(event(EventType::Normal, "UpgradeRolled", "Rollout", note));
    }
    let timeout = ctx.settings.rollout_timeout;
    if waves.halted_by.is_none() && started.elapsed() >= timeout {
        waves.halted_by = Some(key);
        let note = format!(
            "not rolled out {}s after its roll onto operator {version} started (pods of the \
             new template missing or not ready): the upgrade wave is halted, no other stack \
             starts until this one has rolled out (or is changed, paused or deleted)",
            timeout.as_secs()
        );
        tracing::warn!(stack = %ObjectRef::from_obj(stack), "{note}");
        return Some(event(EventType::Warning, "UpgradeHalted", "Rollout", note));
    }
    None
}

/// Forgets `stack` (deleted, or paused): it leaves the queue, frees its slot, and no longer
/// halts the wave.
pub(super) fn forget(ctx: &Context, key: &ObjectRef<MiddlewareStack>) {
    let mut waves = ctx.waves.lock().unwrap_or_else(|p| p.into_inner());
    waves.queue.retain(|k| k != key);
    waves.rolling.remove(key);
    if waves.halted_by.as_ref() == Some(key) {
        waves.halted_by = None;
    }
}
