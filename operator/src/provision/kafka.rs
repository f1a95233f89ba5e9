//! Kafka: the reachability check (a metadata request) and the topics, through the Admin API.
//!
//! One [`KafkaCluster`] (an admin client and a metadata-only consumer, which never
//! auto-creates topics) is kept per bootstrap list and admin user, shared by every stack on
//! that cluster.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::types::RDKafkaRespErr;
use secrecy::ExposeSecret as _;

use super::{AdminCredentials, ProvisionError, SharedClients, bounded};
use crate::crd::SaslMechanism;

mod principals;
mod wire;

pub use principals::{Acl, STACK_MECHANISM, salted_password, stack_acls};

/// How the operator reaches a cluster: its brokers, its login, TLS.
#[derive(Clone, Debug)]
pub struct KafkaAccess {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// The admin login (SASL); none: the brokers take anonymous clients.
    pub credentials: Option<AdminCredentials>,
    /// The SASL mechanism of the login.
    pub mechanism: SaslMechanism,
    /// TLS to the brokers; none: plaintext.
    pub tls: Option<KafkaTlsAccess>,
}

/// TLS to the brokers.
#[derive(Clone, Debug, Default)]
pub struct KafkaTlsAccess {
    /// PEM certificates of the CA to trust; none: the system's roots.
    pub ca_pem: Option<String>,
}

/// librdkafka's `security.protocol` (which takes any case) for a client that logs in with
/// SASL or not, over TLS or not: the operator's and the services' (`KAFKA_SECURITY_PROTOCOL`).
pub fn security_protocol(sasl: bool, tls: bool) -> &'static str {
    match (sasl, tls) {
        (false, false) => "plaintext",
        (false, true) => "ssl",
        (true, false) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    }
}

impl KafkaAccess {
    /// librdkafka's `security.protocol` for this access.
    pub fn security_protocol(&self) -> &'static str {
        security_protocol(self.credentials.is_some(), self.tls.is_some())
    }

    /// What tells two accesses apart (the password fingerprinted, never in clear).
    fn key(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.bootstrap_servers,
            self.mechanism.as_str(),
            self.credentials
                .as_ref()
                .map_or("", |c| c.username.as_str()),
            self.credentials.as_ref().map_or_else(String::new, |c| {
                crate::build::fingerprint([c.password.expose_secret().as_bytes()])
            }),
            self.tls.as_ref().map_or_else(String::new, |t| {
                crate::build::fingerprint([t.ca_pem.as_deref().unwrap_or("system").as_bytes()])
            }),
        )
    }
}

/// One topic as the stack asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTopic {
    /// The full name, `<KAFKA_TOPIC_PREFIX><topic>`.
    pub name: String,
    /// The number of partitions.
    pub partitions: i32,
    /// The replication factor.
    pub replication_factor: i32,
    /// Topic configuration.
    pub config: BTreeMap<String, String>,
}

/// What a topic looks like on the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Existing {
    partitions: i32,
    replication_factor: i32,
}

/// The admin client and metadata consumer of one cluster.
pub struct KafkaCluster {
    admin: AdminClient<DefaultClientContext>,
    /// How the operator reaches the cluster (for the calls librdkafka has no API for).
    access: KafkaAccess,
    /// Its TLS, when `access` asks for TLS.
    tls: Option<tokio_rustls::TlsConnector>,
    metadata: Metadata,
    /// The clients' settings, without a group.
    config: ClientConfig,
    /// One consumer per consumer group whose lag is read ([`KafkaCluster::consumer_lag`]);
    /// it never joins the group, it only reads its committed offsets.
    lag_readers: Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

/// How many consumer groups' lag readers one cluster keeps before it starts over.
const LAG_READERS: usize = 256;

/// The lag of one consumer group on one topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerLag {
    /// Messages between the group's committed offsets (the earliest offset where it has none)
    /// and the partitions' high watermarks, summed over the partitions.
    pub messages: u64,
    /// The topic's partitions.
    pub partitions: i32,
}

/// How many distinct topics one metadata consumer is asked about before it is replaced.
const METADATA_CLIENT_TOPICS: usize = 256;

/// The metadata-only consumer, replaced by a new one after [`METADATA_CLIENT_TOPICS`]
/// distinct topics, because librdkafka keeps every topic a client was asked about (with a
/// queue per partition) until the client is destroyed.
struct Metadata {
    config: ClientConfig,
    current: Mutex<MetadataClient>,
}

struct MetadataClient {
    consumer: Arc<BaseConsumer>,
    topics: HashSet<String>,
}

impl Metadata {
    fn new(config: ClientConfig) -> Result<Self, ProvisionError> {
        let consumer = Arc::new(Self::create(&config)?);
        Ok(Self {
            config,
            current: Mutex::new(MetadataClient {
                consumer,
                topics: HashSet::new(),
            }),
        })
    }

    fn create(config: &ClientConfig) -> Result<BaseConsumer, ProvisionError> {
        config
            .create()
            .map_err(|e| ProvisionError::Kafka(e.to_string()))
    }

    /// The consumer to ask about `topic`.
    fn consumer(&self, topic: &str) -> Result<Arc<BaseConsumer>, ProvisionError> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| ProvisionError::Kafka("metadata client poisoned".to_owned()))?;
        if !current.topics.contains(topic) {
            if current.topics.len() >= METADATA_CLIENT_TOPICS {
                let fresh = Arc::new(Self::create(&self.config)?);
                let old = std::mem::replace(&mut current.consumer, fresh);
                current.topics.clear();
                // Destroying a client waits for its threads: not on the runtime's workers.
                // Requests still using it hold their own reference.
                tokio::task::spawn_blocking(move || drop(old));
            }
            current.topics.insert(topic.to_owned());
        }
        Ok(current.consumer.clone())
    }
}

/// The clients of every cluster a stack uses (one per cluster and credentials, shared).
#[derive(Default)]
pub struct KafkaClients {
    clusters: SharedClients<Arc<KafkaCluster>>,
}

impl KafkaClients {
    /// The clients of the cluster `access` reaches for the stack `user`, created on first
    /// use (see [`SharedClients::get`]).
    ///
    /// # Errors
    /// When librdkafka refuses the configuration.
    pub fn cluster(
        &self,
        user: &str,
        access: &KafkaAccess,
    ) -> Result<Arc<KafkaCluster>, ProvisionError> {
        self.clusters.get(user, access.key(), || connect(access))
    }

    /// Forgets the stack `user` (deleted); a cluster no stack uses any more is dropped.
    pub fn release(&self, user: &str) {
        self.clusters.release(user);
    }

    /// How many clusters' clients are kept.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// Whether no cluster's clients are kept.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }
}

/// New clients of the cluster `access` reaches.
fn connect(access: &KafkaAccess) -> Result<Arc<KafkaCluster>, ProvisionError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &access.bootstrap_servers)
        .set("client.id", "meridian-operator")
        .set("allow.auto.create.topics", "false")
        .set("topic.metadata.refresh.interval.ms", "-1")
        .set("log_level", "3")
        .set("security.protocol", access.security_protocol());
    if let Some(credentials) = &access.credentials {
        config
            .set("sasl.mechanisms", access.mechanism.as_str())
            .set("sasl.username", &credentials.username)
            .set("sasl.password", credentials.password.expose_secret());
    }
    if let Some(ca) = access.tls.as_ref().and_then(|t| t.ca_pem.as_deref()) {
        config.set("ssl.ca.pem", ca);
    }
    let admin = config
        .create()
        .map_err(|e| ProvisionError::Kafka(e.to_string()))?;
    let mut metadata_config = config.clone();
    metadata_config.set("group.id", "meridian-operator-metadata");
    let metadata = Metadata::new(metadata_config)?;
    let tls = access
        .tls
        .as_ref()
        .map(|tls| wire::connector(tls.ca_pem.as_deref()))
        .transpose()?;
    Ok(Arc::new(KafkaCluster {
        admin,
        access: access.clone(),
        tls,
        metadata,
        config,
        lag_readers: Mutex::default(),
    }))
}

impl KafkaCluster {
    /// Whether the operator logs in to this cluster (it can then manage SCRAM logins and ACLs).
    pub fn has_admin_login(&self) -> bool {
        self.access.credentials.is_some()
    }

    /// A metadata request for `topic` (which need not exist): succeeds when a broker answers.
    pub async fn ping(&self, topic: &str, timeout: Duration) -> Result<(), ProvisionError> {
        self.describe(topic, timeout).await.map(|_| ())
    }

    async fn describe(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<Existing>, ProvisionError> {
        let consumer = self.metadata.consumer(topic)?;
        let name = topic.to_owned();
        let task = tokio::task::spawn_blocking(move || {
            let metadata = consumer
                .fetch_metadata(Some(&name), timeout)
                .map_err(|e| ProvisionError::Kafka(format!("metadata request failed: {e}")))?;
            if metadata.brokers().is_empty() {
                return Err(ProvisionError::Kafka(
                    "no broker in the metadata".to_owned(),
                ));
            }
            let Some(topic) = metadata.topics().iter().find(|t| t.name() == name) else {
                return Ok(None);
            };
            match topic.error() {
                None => Ok(Some(Existing {
                    partitions: i32::try_from(topic.partitions().len()).unwrap_or(i32::MAX),
                    replication_factor: topic
                        .partitions()
                        .first()
                        .map_or(0, |p| i32::try_from(p.replicas().len()).unwrap_or(i32::MAX)),
                })),
                Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => Ok(None),
                Some(error) => Err(ProvisionError::Kafka(format!(
                    "metadata of {name}: {error:?}"
                ))),
            }
        });
        bounded("Kafka", timeout + Duration::from_secs(1), async {
            task.await
                .map_err(|e| ProvisionError::Kafka(format!("metadata task failed: {e}")))?
        })
        .await
    }

    /// Brings `topics` to the requested state: creates the missing ones, adds partitions,
    /// sets the requested configuration. Returns the changes Kafka cannot make (fewer
    /// partitions, another replication factor), one sentence each; they are not errors.
    pub async fn reconcile_topics(
        &self,
        topics: &[DesiredTopic],
        timeout: Duration,
    ) -> Result<TopicsOutcome, ProvisionError> {
        let options = AdminOptions::new().operation_timeout(Some(timeout));
        let mut outcome = TopicsOutcome::default();
        let mut missing = Vec::new();
        let mut grow = Vec::new();
        for topic in topics {
            match self.describe(&topic.name, timeout).await? {
                None => missing.push(topic),
                Some(existing) => {
                    if existing.partitions < topic.partitions {
                        grow.push(topic);
                    } else if existing.partitions > topic.partitions {
                        outcome.unsupported.push(format!(
                            "topic {} has {} partitions, more than the {} requested: Kafka cannot remove partitions",
                            topic.name, existing.partitions, topic.partitions
                        ));
                    }
                    if existing.replication_factor != topic.replication_factor {
                        outcome.unsupported.push(format!(
                            "topic {} has replication factor {}, not {}: the operator does not reassign partitions",
                            topic.name, existing.replication_factor, topic.replication_factor
                        ));
                    }
                }
            }
        }
        if !missing.is_empty() {
            let new: Vec<NewTopic<'_>> = missing
                .iter()
                .map(|t| {
                    t.config.iter().fold(
                        NewTopic::new(
                            &t.name,
                            t.partitions,
                            TopicReplication::Fixed(t.replication_factor),
                        ),
                        |new, (k, v)| new.set(k, v),
                    )
                })
                .collect();
            let results = bounded("Kafka", timeout, async {
                self.admin
                    .create_topics(&new, &options)
                    .await
                    .map_err(|e| ProvisionError::Kafka(e.to_string()))
            })
            .await?;
            for result in results {
                match result {
                    Ok(name) => outcome.created.push(name),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) if refused_by_broker(code) => outcome
                        .refused
                        .push(format!("the broker refused to create topic {name}: {code}")),
                    Err((name, code)) => {
                        return Err(ProvisionError::Kafka(format!(
                            "creating topic {name} failed: {code}"
                        )));
                    }
                }
            }
        }
        if !grow.is_empty() {
            let new: Vec<NewPartitions<'_>> = grow
                .iter()
                .map(|t| NewPartitions::new(&t.name, usize::try_from(t.partitions).unwrap_or(1)))
                .collect();
            let results = bounded("Kafka", timeout, async {
                self.admin
                    .create_partitions(&new, &options)
                    .await
                    .map_err(|e| ProvisionError::Kafka(e.to_string()))
            })
            .await?;
            for result in results {
                match result {
                    Ok(name) => outcome.grown.push(name),
                    Err((name, code)) => {
                        return Err(ProvisionError::Kafka(format!(
                            "adding partitions to {name} failed: {code}"
                        )));
                    }
                }
            }
        }
        let configured: Vec<&DesiredTopic> = topics
            .iter()
            .filter(|t| !t.config.is_empty() && !missing.iter().any(|m| m.name == t.name))
            .collect();
        if !configured.is_empty() {
            let differing = self
                .differing_configs(&configured, &options, timeout)
                .await?;
            if !differing.is_empty() {
                self.alter_configs(&differing, &options, timeout, &mut outcome)
                    .await?;
            }
        }
        Ok(outcome)
    }

    /// The topics among `configured` whose settings in Kafka differ from the requested ones,
    /// each with the settings that differ (requested value, current value).
    async fn differing_configs<'a>(
        &self,
        configured: &[&'a DesiredTopic],
        options: &AdminOptions,
        timeout: Duration,
    ) -> Result<Vec<(&'a DesiredTopic, Vec<String>)>, ProvisionError> {
        let specifiers: Vec<ResourceSpecifier<'_>> = configured
            .iter()
            .map(|t| ResourceSpecifier::Topic(&t.name))
            .collect();
        let described = bounded("Kafka", timeout, async {
            self.admin
                .describe_configs(&specifiers, options)
                .await
                .map_err(|e| ProvisionError::Kafka(e.to_string()))
        })
        .await?;
        let mut differing = Vec::new();
        for (topic, resource) in configured.iter().zip(described) {
            let resource = resource.map_err(|code| {
                ProvisionError::Kafka(format!("describing {} failed: {code}", topic.name))
            })?;
            let keys: Vec<String> = topic
                .config
                .iter()
                .filter_map(|(k, v)| {
                    let current = resource.get(k).and_then(|e| e.value.as_deref());
                    (current != Some(v.as_str()))
                        .then(|| format!("{k}={v} (it keeps {})", current.unwrap_or("its default")))
                })
                .collect();
            if !keys.is_empty() {
                differing.push((*topic, keys));
            }
        }
        Ok(differing)
    }

    /// Sets the requested settings of `differing`, then checks that Kafka took them: a value
    /// it cannot parse may be acknowledged and ignored. What it refused or ignored goes to
    /// `outcome.refused`.
    async fn alter_configs(
        &self,
        differing: &[(&DesiredTopic, Vec<String>)],
        options: &AdminOptions,
        timeout: Duration,
        outcome: &mut TopicsOutcome,
    ) -> Result<(), ProvisionError> {
        let alter: Vec<AlterConfig<'_>> = differing
            .iter()
            .map(|(topic, _)| {
                topic.config.iter().fold(
                    AlterConfig::new(ResourceSpecifier::Topic(&topic.name)),
                    |a, (k, v)| a.set(k, v),
                )
            })
            .collect();
        let results = bounded("Kafka", timeout, async {
            self.admin
                .alter_configs(&alter, options)
                .await
                .map_err(|e| ProvisionError::Kafka(e.to_string()))
        })
        .await?;
        let mut acknowledged = Vec::new();
        for (result, (topic, _)) in results.into_iter().zip(differing) {
            match result {
                Ok(_) => acknowledged.push(*topic),
                Err((_, code)) if refused_by_broker(code) => outcome.refused.push(format!(
                    "the broker refused the configuration of topic {}: {code}",
                    topic.name
                )),
                Err((_, code)) => {
                    return Err(ProvisionError::Kafka(format!(
                        "altering the configuration of {} failed: {code}",
                        topic.name
                    )));
                }
            }
        }
        // The brokers learn a change from the controller within moments: look a few times.
        let mut still = Vec::new();
        for attempt in 0..5 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            still = self
                .differing_configs(&acknowledged, options, timeout)
                .await?;
            if still.is_empty() {
                break;
            }
        }
        for (topic, keys) in &still {
            outcome.refused.push(format!(
                "the broker did not apply {} to topic {}",
                keys.join(", "),
                topic.name
            ));
        }
        outcome.configured.extend(
            acknowledged
                .iter()
                .filter(|t| !still.iter().any(|(s, _)| s.name == t.name))
                .map(|t| t.name.clone()),
        );
        Ok(())
    }

    /// The lag of consumer group `group` on `topic`: for each partition, the high watermark
    /// minus the group's committed offset, or minus the low watermark where the group has
    /// committed nothing yet (the services start from the earliest offset). Reads offsets
    /// only: the reader never joins the group, so the group never rebalances for it.
    pub async fn consumer_lag(
        &self,
        group: &str,
        topic: &str,
        timeout: Duration,
    ) -> Result<ConsumerLag, ProvisionError> {
        let reader = self.lag_reader(group)?;
        let name = topic.to_owned();
        let task = tokio::task::spawn_blocking(move || {
            let ranges = common::kafka::unconsumed(&*reader, &name, timeout).map_err(|e| {
                ProvisionError::Kafka(format!("reading the offsets of {name}: {e}"))
            })?;
            if ranges.is_empty() {
                return Err(ProvisionError::Kafka(format!(
                    "topic {name} does not exist"
                )));
            }
            Ok(ConsumerLag {
                messages: ranges.iter().map(common::kafka::Unconsumed::messages).sum(),
                partitions: i32::try_from(ranges.len()).unwrap_or(i32::MAX),
            })
        });
        // Three requests in a row at most, each bounded by `timeout`.
        bounded("Kafka", timeout * 3 + Duration::from_secs(1), async {
            task.await
                .map_err(|e| ProvisionError::Kafka(format!("lag task failed: {e}")))?
        })
        .await
    }

    /// The offsets reader of `group`, created on first use.
    fn lag_reader(&self, group: &str) -> Result<Arc<BaseConsumer>, ProvisionError> {
        let mut readers = self
            .lag_readers
            .lock()
            .map_err(|_| ProvisionError::Kafka("lag reader cache poisoned".to_owned()))?;
        if let Some(reader) = readers.get(group) {
            return Ok(reader.clone());
        }
        if readers.len() >= LAG_READERS {
            // Groups of deleted stacks are never asked about again: start over rather than
            // keep a client (and its threads) per group forever. Destroying a client waits for
            // its threads: not on the runtime's workers.
            let old = std::mem::take(&mut *readers);
            tokio::task::spawn_blocking(move || drop(old));
        }
        let mut config = self.config.clone();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        let reader: Arc<BaseConsumer> = Arc::new(
            config
                .create()
                .map_err(|e| ProvisionError::Kafka(e.to_string()))?,
        );
        readers.insert(group.to_owned(), reader.clone());
        Ok(reader)
    }

    /// Deletes the named topics; topics that are already gone count as deleted.
    pub async fn delete_topics(
        &self,
        names: &[String],
        timeout: Duration,
    ) -> Result<(), ProvisionError> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(timeout));
        let results = bounded("Kafka", timeout, async {
            self.admin
                .delete_topics(&names, &options)
                .await
                .map_err(|e| ProvisionError::Kafka(e.to_string()))
        })
        .await?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => {
                    return Err(ProvisionError::Kafka(format!(
                        "deleting topic {name} failed: {code}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What [`KafkaCluster::reconcile_topics`] did and could not do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicsOutcome {
    /// Topics created.
    pub created: Vec<String>,
    /// Topics that got more partitions.
    pub grown: Vec<String>,
    /// Topics whose configuration was changed.
    pub configured: Vec<String>,
    /// Requested changes Kafka cannot make, one sentence each.
    pub unsupported: Vec<String>,
    /// Requests the broker refused for what they asked (an invalid topic setting, more
    /// replicas than brokers), one sentence each: the spec has to change.
    pub refused: Vec<String>,
}

/// Whether the broker refused a topic request for what it asked, not because it could not
/// serve it: the same request can never succeed.
fn refused_by_broker(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicaAssignment
            | RDKafkaErrorCode::PolicyViolation
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_metadata_consumer_is_replaced_after_enough_distinct_topics() {
        // Nothing listens there: creating a client does not connect.
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "test")
            .set("log_level", "0");
        let metadata = Metadata::new(config).expect("client");
        let first = metadata.consumer("t0").expect("consumer");
        for i in 1..METADATA_CLIENT_TOPICS {
            let same = metadata.consumer(&format!("t{i}")).expect("consumer");
            assert!(Arc::ptr_eq(&first, &same), "replaced after {i} topics");
        }
        // Asking again about a known topic costs nothing.
        assert!(Arc::ptr_eq(
            &first,
            &metadata.consumer("t0").expect("consumer")
        ));
        let next = metadata.consumer("one-more").expect("consumer");
        assert!(!Arc::ptr_eq(&first, &next));
        assert!(Arc::ptr_eq(
            &next,
            &metadata.consumer("one-more").expect("consumer")
        ));
    }
}
