//! What the benchmark reads from a Redis Cluster's seed node: its size and state
//! (`CLUSTER INFO`) and which master serves each room's channel (`CLUSTER NODES`,
//! `CLUSTER KEYSLOT`), over a connection to the seed alone (redis-rs).

use std::time::Duration;

use anyhow::{Context as _, bail};

/// How long connecting and each command may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `host:port` of a Redis URL (the first, when it lists several), without its credentials:
/// what the benchmark prints.
pub fn address(url: &str) -> String {
    first_url(url)
        .ok()
        .and_then(|url| {
            Some(format!(
                "{}:{}",
                url.host_str()?,
                url.port().unwrap_or(6379)
            ))
        })
        .unwrap_or_else(|| "(unparsable URL)".to_owned())
}

fn first_url(urls: &str) -> anyhow::Result<reqwest::Url> {
    let first = urls
        .split(',')
        .map(str::trim)
        .find(|u| !u.is_empty())
        .context("the Redis Cluster URL is empty")?;
    reqwest::Url::parse(first).context("the Redis Cluster URL does not parse")
}

/// A connection to the seed node.
pub struct Seed {
    conn: redis::aio::MultiplexedConnection,
    /// Its `host:port`.
    pub address: String,
}

/// What `CLUSTER INFO` and `CLUSTER NODES` said.
pub struct Cluster {
    /// `cluster_size`: the masters serving at least one slot.
    pub masters: usize,
    /// Each master's `host:port` and slot ranges, by address.
    slots: Vec<(String, Vec<(u16, u16)>)>,
}

impl Seed {
    /// Connects to the first node `urls` names, with its credentials (and TLS for
    /// `rediss://`).
    pub async fn connect(urls: &str) -> anyhow::Result<Self> {
        let url = first_url(urls)?;
        let address = address(url.as_str());
        let client = common::redis::client(url.as_str())
            .with_context(|| format!("invalid Redis Cluster URL for {address}"))?;
        let conn = tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .with_context(|| format!("connecting to {address} timed out"))?
            .with_context(|| format!("failed to connect to {address}"))?;
        Ok(Self { conn, address })
    }

    /// Sends `args` as one command; its reply as text.
    pub async fn command(&mut self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = redis::cmd(args.first().copied().unwrap_or_default());
        cmd.arg(args.get(1..).unwrap_or_default());
        let name = args.first().copied().unwrap_or_default();
        let reply: redis::Value = tokio::time::timeout(TIMEOUT, cmd.query_async(&mut self.conn))
            .await
            .with_context(|| format!("{name} on {} timed out", self.address))?
            .with_context(|| format!("{name} on {} failed", self.address))?;
        match reply {
            redis::Value::Int(n) => Ok(n.to_string()),
            other => redis::from_redis_value(other)
                .with_context(|| format!("{name} on {} answered no text", self.address)),
        }
    }

    /// `CLUSTER INFO` (which must say `cluster_state:ok`) and the masters' slots.
    pub async fn cluster(&mut self) -> anyhow::Result<Cluster> {
        let info = self.command(&["CLUSTER", "INFO"]).await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if field("cluster_state") != Some("ok") {
            bail!(
                "the Redis Cluster at {} is not serving every slot: cluster_state:{}",
                self.address,
                field("cluster_state").unwrap_or("(missing)")
            );
        }
        let masters = field("cluster_size")
            .and_then(|size| size.parse().ok())
            .context("CLUSTER INFO has no cluster_size")?;
        // `<id> <host:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link>
        // <slot or range>...`; a slot being moved is `[slot-<-id]` or `[slot->-id]`.
        let nodes = self.command(&["CLUSTER", "NODES"]).await?;
        let mut slots: Vec<(String, Vec<(u16, u16)>)> = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let flags = fields.get(2)?;
                if !flags.split(',').any(|f| f == "master") {
                    return None;
                }
                let address = fields.get(1)?.split('@').next()?.to_owned();
                let ranges = fields
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| {
                        let (start, end) = s.split_once('-').unwrap_or((s, s));
                        Some((start.parse().ok()?, end.parse().ok()?))
                    })
                    .collect();
                Some((address, ranges))
            })
            .collect();
        slots.sort();
        Ok(Cluster { masters, slots })
    }
}

impl Cluster {
    /// How many of `keys` (room channels) each master serves, by the slot the seed computes
    /// for each (`CLUSTER KEYSLOT`): `host:port n` for each master.
    pub async fn spread(&self, seed: &mut Seed, keys: &[String]) -> anyhow::Result<String> {
        let mut counts = vec![0_usize; self.slots.len()];
        for key in keys {
            let slot: u16 = seed
                .command(&["CLUSTER", "KEYSLOT", key])
                .await?
                .parse()
                .context("CLUSTER KEYSLOT did not answer a slot")?;
            if let Some(i) = self.slots.iter().position(|(_, ranges)| {
                ranges
                    .iter()
                    .any(|(start, end)| (*start..=*end).contains(&slot))
            }) && let Some(count) = counts.get_mut(i)
            {
                *count += 1;
            }
        }
        Ok(self
            .slots
            .iter()
            .zip(counts)
            .map(|((address, _), count)| format!("{address} {count}"))
            .collect::<Vec<_>>()
            .join(", "))
    }
}
