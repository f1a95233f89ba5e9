use secrecy::ExposeSecret;

use super::*;

#[test]
fn defaults_point_at_the_local_development_dependencies() {
    let vars = Vars::default();
    let common: CommonConfig = vars.parse().unwrap();
    let pg: PostgresConfig = vars.parse().unwrap();
    let redis: RedisConfig = vars.parse().unwrap();
    let kafka: KafkaConfig = vars.parse().unwrap();

    assert_eq!(common.listen_addr(8082).to_string(), "0.0.0.0:8082");
    assert_eq!(common.log_format, LogFormat::Text);
    assert_eq!(common.rust_log, "info");
    assert!(common.otel_exporter_otlp_endpoint.is_none());
    assert_eq!(common.readiness_timeout(), Duration::from_secs(2));
    assert_eq!(common.shutdown_grace(), Duration::from_secs(25));
    assert_eq!(
        pg.database_url.expose_secret(),
        "postgres://postgres:postgres@127.0.0.1:5432/middleware"
    );
    assert_eq!(pg.database_max_connections, 10);
    assert_eq!(redis.redis_url.expose_secret(), "redis://127.0.0.1:6379");
    assert_eq!(redis.redis_key_prefix, "meridian:");
    assert_eq!(kafka.kafka_bootstrap_servers, "127.0.0.1:9092");
    assert_eq!(kafka.topic("commands"), "commands");
}

#[test]
fn environment_variables_override_defaults() {
    let vars = Vars::from_pairs([
        ("PORT", "9000"),
        ("BIND_ADDRESS", "127.0.0.1"),
        ("LOG_FORMAT", "json"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ("DATABASE_MAX_CONNECTIONS", "32"),
        ("KAFKA_TOPIC_PREFIX", "team-a."),
        ("REDIS_KEY_PREFIX", "team-a:"),
    ]);
    let common: CommonConfig = vars.parse().unwrap();
    let pg: PostgresConfig = vars.parse().unwrap();
    let kafka: KafkaConfig = vars.parse().unwrap();
    let redis: RedisConfig = vars.parse().unwrap();

    assert_eq!(common.listen_addr(8082).to_string(), "127.0.0.1:9000");
    assert_eq!(common.log_format, LogFormat::Json);
    assert_eq!(
        common.otel_exporter_otlp_endpoint.unwrap().as_str(),
        "http://collector:4318/"
    );
    assert!((common.otel_traces_sampler_arg - 0.25).abs() < f64::EPSILON);
    assert_eq!(pg.database_max_connections, 32);
    assert_eq!(kafka.topic("events"), "team-a.events");
    assert_eq!(redis.redis_key_prefix, "team-a:");
}

#[test]
fn empty_values_fall_back_to_defaults() {
    let vars = Vars::from_pairs([("PORT", ""), ("LOG_FORMAT", "")]);
    let common: CommonConfig = vars.parse().unwrap();
    assert_eq!(common.port, None);
    assert_eq!(common.log_format, LogFormat::Text);
}

#[test]
fn malformed_values_are_rejected_with_the_variable_name() {
    let err = Vars::from_pairs([("PORT", "eighty")])
        .parse::<CommonConfig>()
        .unwrap_err();
    assert!(err.to_string().contains("PORT"), "{err}");

    let err = Vars::from_pairs([("LOG_FORMAT", "xml")])
        .parse::<CommonConfig>()
        .unwrap_err();
    assert!(err.to_string().contains("xml"), "{err}");
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let vars = Vars::from_pairs([
        ("DATABASE_URL", "postgres://app:hunter2@db:5432/app"),
        ("REDIS_URL", "redis://app:hunter3@redis:6379"),
        ("KAFKA_SASL_PASSWORD", "hunter4"),
    ]);
    let pg: PostgresConfig = vars.parse().unwrap();
    let redis: RedisConfig = vars.parse().unwrap();
    let kafka: KafkaConfig = vars.parse().unwrap();
    let printed = format!("{pg:?} {redis:?} {kafka:?}");
    for secret in ["hunter2", "hunter3", "hunter4"] {
        assert!(!printed.contains(secret), "{secret} leaked: {printed}");
    }
}
