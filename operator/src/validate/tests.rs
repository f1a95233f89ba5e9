use super::*;
use crate::fixtures;

#[test]
fn valid_fixtures_pass_with_their_identity_and_derived_prefixes() {
    let cases = [
        (fixtures::stack(fixtures::MINIMAL), "mini", "team-a"),
        (
            fixtures::stack(fixtures::EDGE_DISABLED),
            "core-only",
            "team-b",
        ),
        (fixtures::example(), "demo", "demo-ns"),
    ];
    for (stack, name, namespace) in cases {
        let validated = validate(&stack).unwrap();
        assert_eq!(validated.name(), name);
        assert_eq!(validated.namespace(), namespace);
        assert_eq!(validated.topic_prefix(), format!("{namespace}.{name}."));
        assert_eq!(
            validated.redis_key_prefix(),
            format!("meridian:{namespace}:{name}:")
        );
        let owner = validated.owner();
        assert_eq!(owner.kind, "MiddlewareStack");
        assert_eq!(owner.api_version, "meridian.dev/v1beta1");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(Some(&owner.uid), stack.metadata.uid.as_ref());
    }
}

#[test]
fn each_broken_rule_is_reported_with_the_field_and_what_is_allowed() {
    type Mutation = fn(&mut MiddlewareStack);
    let cases: [(Mutation, Problem, &str); 11] = [
        (
            |s| s.metadata.name = Some("x".repeat(48)),
            Problem::NameTooLong { len: 48 },
            "metadata.name is 48 characters long, more than the 47 allowed",
        ),
        (
            |s| s.spec.services.hub.replicas = -1,
            Problem::NegativeReplicas {
                service: "hub",
                replicas: -1,
            },
            "spec.services.hub.replicas is -1 but must be at least 0",
        ),
        (
            |s| s.spec.kafka.topics.dlq.partitions = 0,
            Problem::TooFewPartitions {
                topic: "dlq",
                partitions: 0,
            },
            "spec.kafka.topics.dlq.partitions is 0 but must be at least 1",
        ),
        (
            |s| s.spec.kafka.topics.cache.replication_factor = 0,
            Problem::TooLowReplicationFactor {
                topic: "cache",
                replication_factor: 0,
            },
            "spec.kafka.topics.cache.replicationFactor is 0 but must be at least 1",
        ),
        (
            |s| s.spec.redis.url = "http://redis:6379".to_owned(),
            Problem::RedisUrlScheme,
            "spec.redis.url must start with redis:// or rediss://",
        ),
        (
            |s| s.spec.redis.url = "redis://u:p@redis:6379".to_owned(),
            Problem::RedisUrlCredentials,
            "spec.redis.url must not contain credentials: put them in the Secret of adminSecretRef",
        ),
        (
            |s| s.spec.postgres.port = 65536,
            Problem::PortOutOfRange(65536),
            "spec.postgres.port is 65536 but must be between 1 and 65535",
        ),
        (
            |s| {
                let auth = s.spec.auth.as_mut().unwrap();
                auth.jwks_url = Some("https://auth.example.invalid/jwks".to_owned());
            },
            Problem::AuthBothModes,
            "spec.auth.jwtSecretRef and spec.auth.jwksUrl are mutually exclusive: set only one",
        ),
        (
            |s| s.spec.auth.as_mut().unwrap().jwt_secret_ref = None,
            Problem::AuthNoMode,
            "spec.auth needs either jwtSecretRef or jwksUrl",
        ),
        (
            |s| {
                let policies = &mut s.spec.rate_limits.policies;
                policies[1].name = policies[0].name.clone();
            },
            Problem::DuplicateRateLimitPolicy("per-user".to_owned()),
            "spec.rateLimits.policies has two policies named \"per-user\" but names must be unique",
        ),
        (
            |s| s.spec.telemetry.sampling_ratio = f64::NAN,
            Problem::SamplingRatioOutOfRange(f64::NAN),
            "spec.telemetry.samplingRatio is NaN but must be between 0 and 1",
        ),
    ];
    for (mutate, problem, message) in cases {
        let mut stack = fixtures::example();
        mutate(&mut stack);
        let error = validate(&stack).unwrap_err();
        let ValidateError::InvalidSpec(Problems(problems)) = &error else {
            panic!("not an invalid spec: {error}");
        };
        assert_eq!(problems.len(), 1, "{message}: {problems:?}");
        // NaN != NaN, so compare the rendered messages, which name the field and the value.
        assert_eq!(problems[0].to_string(), problem.to_string());
        assert_eq!(problems[0].to_string(), message);
        assert_eq!(
            error.to_string(),
            format!("failed to validate the stack: {message}")
        );
    }
}

#[test]
fn a_stack_that_slipped_past_admission_gets_every_problem_listed_at_once() {
    let error = validate(&fixtures::stack(fixtures::INVALID)).unwrap_err();
    assert_eq!(
        error,
        ValidateError::InvalidSpec(Problems(vec![
            Problem::NameTooLong { len: 53 },
            Problem::NegativeReplicas {
                service: "gateway",
                replicas: -2
            },
            Problem::TooFewPartitions {
                topic: "events",
                partitions: 0
            },
            Problem::TooLowReplicationFactor {
                topic: "events",
                replication_factor: 0
            },
            Problem::RedisUrlCredentials,
            Problem::PortOutOfRange(0),
            Problem::AuthBothModes,
            Problem::DuplicateRateLimitPolicy("per-user".to_owned()),
            Problem::SamplingRatioOutOfRange(2.5),
        ]))
    );
    assert_eq!(error.metric_label(), "invalid_spec");
    let message = error.to_string();
    assert!(message.starts_with("failed to validate the stack: metadata.name is 53"));
    assert_eq!(message.matches("; ").count(), 8, "{message}");
}

#[test]
fn a_stack_without_server_set_metadata_is_refused_naming_the_missing_field() {
    type Mutation = fn(&mut MiddlewareStack);
    let cases: [(Mutation, &str); 3] = [
        (|s| s.metadata.name = None, "name"),
        (|s| s.metadata.namespace = None, "namespace"),
        (|s| s.metadata.uid = None, "uid"),
    ];
    for (mutate, field) in cases {
        let mut stack = fixtures::example();
        mutate(&mut stack);
        let error = validate(&stack).unwrap_err();
        assert_eq!(error, ValidateError::MissingMetadata(field));
        assert_eq!(error.metric_label(), "missing_metadata");
        assert_eq!(
            error.to_string(),
            format!("failed to validate the stack: metadata.{field} is missing")
        );
    }
}

#[test]
fn the_longest_allowed_name_keeps_every_object_name_within_63_characters() {
    let mut stack = fixtures::example();
    stack.metadata.name = Some("a".repeat(MAX_STACK_NAME_LEN));
    let validated = validate(&stack).unwrap();
    for component in Component::ALL {
        assert!(crate::build::object_name(&validated, component).len() <= 63);
    }
}

#[test]
fn enabled_lists_only_the_services_that_run() {
    let validated = validate(&fixtures::stack(fixtures::EDGE_DISABLED)).unwrap();
    assert_eq!(
        validated.enabled().into_iter().collect::<Vec<_>>(),
        [
            Component::CommandService,
            Component::Processor,
            Component::CacheUpdater
        ]
    );
}
