//! The five services of a stack ([`Component`]), and what the build step needs to know about
//! each: its name, port, tier, settings in the spec and dependencies.
use crate::crd::{ServiceSpec, ServicesSpec};

/// One of the five services, in start-up order (core first, then edge: hub, then gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// `command-service`.
    CommandService,
    /// `processor`.
    Processor,
    /// `cache-updater`.
    CacheUpdater,
    /// `ws-hub`.
    WsHub,
    /// `api-gateway`.
    Gateway,
}

/// Whether a service belongs to the core stage or the edge stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Command service, processor, cache updater.
    Core,
    /// WebSocket hub and API gateway: exposed to clients, started after the core.
    Edge,
}

impl Tier {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::Edge => "edge",
        }
    }
}

impl Component {
    /// Every service, in start-up order.
    pub const ALL: [Self; 5] = [
        Self::CommandService,
        Self::Processor,
        Self::CacheUpdater,
        Self::WsHub,
        Self::Gateway,
    ];

    /// The service's name: its image, its `app.kubernetes.io/name` and `OTEL_SERVICE_NAME`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "api-gateway",
            Self::CommandService => "command-service",
            Self::Processor => "processor",
            Self::CacheUpdater => "cache-updater",
            Self::WsHub => "ws-hub",
        }
    }

    /// The service's field under `spec.services`.
    pub fn field(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::CommandService => "commandService",
            Self::Processor => "processor",
            Self::CacheUpdater => "cacheUpdater",
            Self::WsHub => "hub",
        }
    }

    /// The HTTP port (API, `/health`, `/ready`, `/metrics`).
    pub fn port(self) -> i32 {
        match self {
            Self::Gateway => 8080,
            Self::CommandService => 8082,
            Self::Processor => 8083,
            Self::CacheUpdater => 8084,
            Self::WsHub => 8085,
        }
    }

    /// The stage the service is started in.
    pub fn tier(self) -> Tier {
        match self {
            Self::CommandService | Self::Processor | Self::CacheUpdater => Tier::Core,
            Self::WsHub | Self::Gateway => Tier::Edge,
        }
    }

    /// The service's settings in the spec.
    pub fn spec(self, services: &ServicesSpec) -> &ServiceSpec {
        match self {
            Self::Gateway => &services.gateway,
            Self::CommandService => &services.command_service,
            Self::Processor => &services.processor,
            Self::CacheUpdater => &services.cache_updater,
            Self::WsHub => &services.hub,
        }
    }

    /// Whether clients call the service through its Service's virtual IP: the gateway, the
    /// hub and the command service (called by the gateway). The processor and the cache
    /// updater only consume Kafka; nothing calls them but the kubelet's probes (direct to the
    /// pod) and metrics scrapers (which discover pods through the Service's endpoints), so
    /// their Services are headless. That keeps two of a stack's five Services out of the
    /// cluster's service CIDR and out of kube-proxy's rules on every node, and skips the API
    /// server's ClusterIP allocation, which Kubernetes serialises cluster-wide (one
    /// `IPAddress` create at a time).
    pub fn has_virtual_ip(self) -> bool {
        matches!(self, Self::Gateway | Self::CommandService | Self::WsHub)
    }

    /// Whether the service talks to PostgreSQL (`DATABASE_URL`).
    pub fn uses_postgres(self) -> bool {
        matches!(self, Self::CommandService | Self::Processor)
    }

    /// Whether the service talks to Redis (`REDIS_URL`, `REDIS_KEY_PREFIX`).
    pub fn uses_redis(self) -> bool {
        matches!(self, Self::Gateway | Self::CacheUpdater | Self::WsHub)
    }

    /// Whether the service verifies callers' tokens (`JWT_*`): the gateway, the hub, and the
    /// command service (which authorizes each command against the token the gateway forwards).
    pub fn verifies_tokens(self) -> bool {
        matches!(self, Self::Gateway | Self::CommandService | Self::WsHub)
    }

    /// What the service consumes, if it is a Kafka consumer: the topic (without the stack's
    /// prefix), the variable that overrides its consumer group, and the group's name after the
    /// prefix. The processor and the cache updater scale on this group's lag.
    pub fn consumes(self) -> Option<Consumption> {
        match self {
            Self::Processor => Some(Consumption {
                topic: "commands",
                group_variable: "PROCESSOR_CONSUMER_GROUP",
                group_suffix: "processor",
            }),
            Self::CacheUpdater => Some(Consumption {
                topic: "events",
                group_variable: "CACHE_CONSUMER_GROUP",
                group_suffix: "cache-updater",
            }),
            Self::CommandService | Self::WsHub | Self::Gateway => None,
        }
    }

    /// Whether the service talks to Kafka (`KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_TOPIC_PREFIX`).
    pub fn uses_kafka(self) -> bool {
        matches!(
            self,
            Self::CommandService | Self::Processor | Self::CacheUpdater
        )
    }
}

/// What a consumer service reads ([`Component::consumes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consumption {
    /// The topic, without the stack's prefix.
    pub topic: &'static str,
    /// The environment variable that names another consumer group.
    pub group_variable: &'static str,
    /// The default group: `<KAFKA_TOPIC_PREFIX><group_suffix>`.
    pub group_suffix: &'static str,
}
