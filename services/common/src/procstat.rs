//! Per-process CPU use from `/proc` (feature `procstat`), for the benchmarks: where a run's
//! CPU went on a machine the services share with their dependencies.

use std::collections::BTreeMap;

use procfs::process::all_processes;
use procfs::{CurrentSI as _, KernelStats};

/// CPU time (user + system, in clock ticks) of every process by pid, with its name, and the
/// machine's busy and total ticks.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    processes: BTreeMap<i32, (String, u64)>,
    busy: u64,
    total: u64,
    cores: usize,
}

impl CpuSnapshot {
    /// Reads `/proc` now; what cannot be read (a process that just ended) is left out.
    pub fn take() -> Self {
        let mut processes = BTreeMap::new();
        for process in all_processes().into_iter().flatten().flatten() {
            if let Ok(stat) = process.stat() {
                processes.insert(stat.pid, (stat.comm, stat.utime + stat.stime));
            }
        }
        let Ok(machine) = KernelStats::current() else {
            return Self {
                processes,
                ..Self::default()
            };
        };
        let t = &machine.total;
        let extra = |v: Option<u64>| v.unwrap_or(0);
        // idle and iowait are not busy; guest time is already counted in user.
        let total = t.user
            + t.nice
            + t.system
            + t.idle
            + extra(t.iowait)
            + extra(t.irq)
            + extra(t.softirq)
            + extra(t.steal);
        let idle = t.idle + extra(t.iowait);
        Self {
            processes,
            busy: total.saturating_sub(idle),
            total,
            cores: machine.cpu_time.len().max(1),
        }
    }

    /// Since `before`: each process name's CPU as a share of one core (processes that
    /// started in between count whole, ones that ended are missing; shares under 0.5 % are
    /// left out), largest first, and the machine's idle share.
    pub fn since(&self, before: &Self) -> (Vec<(String, f64)>, f64) {
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        let core = total / self.cores.max(1) as f64;
        let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
        for (pid, (name, ticks)) in &self.processes {
            let earlier = match before.processes.get(pid) {
                Some((old, ticks)) if old == name => *ticks,
                _ => 0,
            };
            *by_name.entry(name).or_default() += ticks.saturating_sub(earlier);
        }
        let mut shares: Vec<(String, f64)> = by_name
            .into_iter()
            .map(|(name, ticks)| (name.to_owned(), ticks as f64 / core))
            .filter(|(_, share)| *share >= 0.005)
            .collect();
        shares.sort_by(|a, b| b.1.total_cmp(&a.1));
        let busy = self.busy.saturating_sub(before.busy) as f64;
        (shares, (1.0 - busy / total).max(0.0))
    }
}

/// `name 98 %, name 21 %, …; idle 3 %` for [`CpuSnapshot::since`]'s result.
pub fn describe((shares, idle): &(Vec<(String, f64)>, f64)) -> String {
    let each: Vec<String> = shares
        .iter()
        .map(|(name, share)| format!("{name} {:.0} %", share * 100.0))
        .collect();
    format!("{}; machine idle {:.1} %", each.join(", "), idle * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_per_core_by_name_and_idle_is_the_rest() {
        let before = CpuSnapshot {
            processes: BTreeMap::from([(1, ("postgres".into(), 100)), (2, ("java".into(), 50))]),
            busy: 1000,
            total: 2000,
            cores: 2,
        };
        let after = CpuSnapshot {
            processes: BTreeMap::from([
                (1, ("postgres".into(), 150)),
                (2, ("java".into(), 60)),
                (3, ("postgres".into(), 40)), // started in between: counts whole
            ]),
            busy: 1180,
            total: 2200,
            cores: 2,
        };
        let (shares, idle) = after.since(&before);
        // 200 ticks over two cores: 100 ticks are one core.
        assert_eq!(
            shares,
            [("postgres".to_owned(), 0.9), ("java".to_owned(), 0.1)]
        );
        assert!((idle - 0.1).abs() < 1e-9);
        assert_eq!(
            describe(&(shares, idle)),
            "postgres 90 %, java 10 %; machine idle 10.0 %"
        );
    }
}
