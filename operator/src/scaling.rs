//! How many replicas the processor and the cache updater run when they scale on Kafka
//! consumer lag (`spec.services.<service>.autoscaling`): the operator reads the lag of their
//! consumer group and decides here (pure). An HPA cannot do it without an external-metrics
//! adapter, and none is needed: the operator already talks to Kafka.
//!
//! The policy, like the HorizontalPodAutoscaler's:
//! - the wanted count is `ceil(lag / targetLagPerReplica)`, within `minReplicas` and the
//!   *ceiling*: `maxReplicas`, but never more than the consumed topic's partitions (a consumer
//!   beyond them gets no partition and only adds rebalances);
//! - up at once, to the wanted count;
//! - down only with hysteresis (the lag must fit the smaller count with a fifth to spare) and
//!   after it has stayed low for `scaleDownDelaySeconds` (so a lull between bursts does not
//!   shed the consumers the next burst needs, and every rebalance a scale causes is earned).
use std::time::{Duration, Instant};

/// The bounds and targets of one consumer service's scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LagPolicy {
    /// The fewest replicas.
    pub min: i32,
    /// The most replicas (`maxReplicas`).
    pub max: i32,
    /// The partitions of the topic the service consumes.
    pub partitions: i32,
    /// The lag one replica is expected to work off (`targetLagPerReplica`).
    pub target_lag_per_replica: u64,
    /// How long the lag must stay low before a scale-down (`scaleDownDelaySeconds`).
    pub scale_down_delay: Duration,
}

impl LagPolicy {
    /// The most replicas worth running: `max`, within the partitions, never below `min`.
    pub fn ceiling(&self) -> i32 {
        self.max.min(self.partitions).max(self.min)
    }

    /// `ceil(lag / per_replica)` within `min` and the ceiling.
    fn replicas_for(&self, lag: u64, per_replica: u64) -> i32 {
        let per_replica = per_replica.max(1);
        let wanted = lag.div_ceil(per_replica);
        let wanted = i32::try_from(wanted).unwrap_or(i32::MAX);
        wanted.clamp(self.min, self.ceiling())
    }
}

/// What the scaler remembers about one service between reconciles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Since when the lag has fitted fewer replicas than run now (with the hysteresis margin).
    pub low_since: Option<Instant>,
}

/// A decision for one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep `current`.
    Keep,
    /// Scale to this many replicas.
    Scale {
        /// The new count.
        to: i32,
        /// Why.
        why: Why,
    },
}

/// Why the count changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The lag needs more consumers.
    LagHigh,
    /// The lag has been low for the scale-down delay.
    LagLow,
    /// The count is outside the bounds (the spec changed, or the topic's partitions did).
    Bounds,
}

/// Decides the replica count of a service that runs `current` replicas with `lag` messages
/// not yet consumed, at `now`; returns the decision and what to remember for the next one.
pub fn decide(
    policy: &LagPolicy,
    current: i32,
    lag: u64,
    memory: Memory,
    now: Instant,
) -> (Decision, Memory) {
    let ceiling = policy.ceiling();
    if current < policy.min || current > ceiling {
        let to = current.clamp(policy.min, ceiling);
        let wanted = policy.replicas_for(lag, policy.target_lag_per_replica);
        // Out of bounds: at least back within them, and up to what the lag wants.
        let to = if wanted > to { wanted } else { to };
        return (
            Decision::Scale {
                to,
                why: Why::Bounds,
            },
            Memory::default(),
        );
    }
    let wanted = policy.replicas_for(lag, policy.target_lag_per_replica);
    if wanted > current {
        return (
            Decision::Scale {
                to: wanted,
                why: Why::LagHigh,
            },
            Memory::default(),
        );
    }
    // Down only when the lag fits the smaller count with a fifth of headroom.
    let with_headroom = policy.replicas_for(lag, policy.target_lag_per_replica * 4 / 5);
    if with_headroom >= current {
        return (Decision::Keep, Memory::default());
    }
    let low_since = memory.low_since.unwrap_or(now);
    if now.saturating_duration_since(low_since) >= policy.scale_down_delay {
        return (
            Decision::Scale {
                to: with_headroom,
                why: Why::LagLow,
            },
            Memory::default(),
        );
    }
    (
        Decision::Keep,
        Memory {
            low_since: Some(low_since),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LagPolicy {
        LagPolicy {
            min: 1,
            max: 4,
            partitions: 6,
            target_lag_per_replica: 100,
            scale_down_delay: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_growing_lag_scales_up_at_once_to_what_it_needs_within_the_ceiling() {
        let now = Instant::now();
        let (decision, _) = decide(&policy(), 1, 250, Memory::default(), now);
        assert_eq!(
            decision,
            Decision::Scale {
                to: 3,
                why: Why::LagHigh
            }
        );
        // Never past maxReplicas...
        let (decision, _) = decide(&policy(), 1, 100_000, Memory::default(), now);
        assert_eq!(
            decision,
            Decision::Scale {
                to: 4,
                why: Why::LagHigh
            }
        );
        // ...nor past the partitions.
        let narrow = LagPolicy {
            partitions: 2,
            ..policy()
        };
        let (decision, _) = decide(&narrow, 1, 100_000, Memory::default(), now);
        assert_eq!(
            decision,
            Decision::Scale {
                to: 2,
                why: Why::LagHigh
            }
        );
        // At the ceiling, nothing more to do.
        assert_eq!(
            decide(&narrow, 2, 100_000, Memory::default(), now).0,
            Decision::Keep
        );
    }

    #[test]
    fn a_low_lag_scales_down_only_after_the_delay_and_with_headroom() {
        let start = Instant::now();
        let policy = policy();
        // 3 replicas, lag 190: two would need 95 each (under 100) but not 80 each: keep.
        let (decision, memory) = decide(&policy, 3, 190, Memory::default(), start);
        assert_eq!(decision, Decision::Keep);
        assert_eq!(memory, Memory::default());
        // Lag 150 fits two with headroom (80 each): remembered, not acted on yet.
        let (decision, memory) = decide(&policy, 3, 150, Memory::default(), start);
        assert_eq!(decision, Decision::Keep);
        assert_eq!(memory.low_since, Some(start));
        let later = start + Duration::from_secs(30);
        let (decision, memory) = decide(&policy, 3, 150, memory, later);
        assert_eq!((decision, memory.low_since), (Decision::Keep, Some(start)));
        // A burst in between starts the wait over.
        let (decision, reset) = decide(&policy, 3, 250, memory, later);
        assert_eq!((decision, reset), (Decision::Keep, Memory::default()));
        // Low for the whole delay: down to what the lag needs.
        let done = start + Duration::from_secs(60);
        let (decision, memory) = decide(&policy, 3, 150, memory, done);
        assert_eq!(
            decision,
            Decision::Scale {
                to: 2,
                why: Why::LagLow
            }
        );
        assert_eq!(memory, Memory::default());
        // No lag at all: down to the minimum, never below.
        let (decision, _) = decide(
            &policy,
            4,
            0,
            Memory {
                low_since: Some(start),
            },
            done,
        );
        assert_eq!(
            decision,
            Decision::Scale {
                to: 1,
                why: Why::LagLow
            }
        );
        assert_eq!(
            decide(&policy, 1, 0, Memory::default(), done).0,
            Decision::Keep
        );
    }

    #[test]
    fn a_count_outside_the_bounds_is_brought_back_at_once() {
        let now = Instant::now();
        let policy = LagPolicy { min: 2, ..policy() };
        assert_eq!(
            decide(&policy, 1, 0, Memory::default(), now).0,
            Decision::Scale {
                to: 2,
                why: Why::Bounds
            }
        );
        assert_eq!(
            decide(&policy, 6, 0, Memory::default(), now).0,
            Decision::Scale {
                to: 4,
                why: Why::Bounds
            }
        );
        // Below the minimum with a lag that wants more: straight to what it wants.
        assert_eq!(
            decide(&policy, 1, 350, Memory::default(), now).0,
            Decision::Scale {
                to: 4,
                why: Why::Bounds
            }
        );
        // A minimum above the partitions wins over them: the user asked for it.
        let wide = LagPolicy {
            min: 3,
            partitions: 2,
            ..policy
        };
        assert_eq!(wide.ceiling(), 3);
        assert_eq!(
            decide(&wide, 3, 100_000, Memory::default(), now).0,
            Decision::Keep
        );
    }

    #[test]
    fn a_zero_target_is_treated_as_one_message_per_replica() {
        let policy = LagPolicy {
            target_lag_per_replica: 0,
            ..policy()
        };
        assert_eq!(
            decide(&policy, 1, 3, Memory::default(), Instant::now()).0,
            Decision::Scale {
                to: 3,
                why: Why::LagHigh
            }
        );
    }
}
