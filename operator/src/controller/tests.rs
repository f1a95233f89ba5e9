use super::*;

#[tokio::test]
async fn work_past_its_bound_is_cancelled_with_a_timed_out_error() {
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    let stuck = async move {
        let _held = dropped_tx;
        futures::future::pending::<Result<(), Error>>().await
    };
    let error = deadline("cleanup", Duration::from_millis(50), stuck)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::TimedOut {
                work: "cleanup",
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(error.reason(), "ReconcileTimedOut");
    assert!(
        error
            .to_string()
            .starts_with("cleanup did not finish within 50ms"),
        "{error}"
    );
    assert!(dropped_rx.await.is_err(), "the work was dropped");

    let done = deadline("reconcile", Duration::from_secs(5), async { Ok(7) }).await;
    assert_eq!(done.unwrap(), 7);
}

fn api_error(code: u16) -> kube::Error {
    kube::Error::Api(Box::new(kube::core::Status {
        code,
        ..kube::core::Status::failure("the server refused", "Conflict")
    }))
}

/// The condition (type, status, reason, message) an error sets, if any.
fn condition(error: &Error) -> Option<(&'static str, Status, String, String)> {
    error
        .report()
        .map(|r| (r.type_, r.status, r.reason, r.message))
}

#[test]
fn each_steps_errors_keep_their_metric_reasons_and_conditions() {
    use crate::provision::ProvisionError;

    let missing = Error::from(dereference::Error::SecretNotFound {
        name: "pg-admin".to_owned(),
    });
    assert_eq!(missing.reason(), "SecretNotFound");
    assert_eq!(
        condition(&missing),
        Some((
            conditions::DEPENDENCIES_READY,
            Status::False,
            "SecretNotFound".to_owned(),
            "Secret pg-admin not found".to_owned()
        ))
    );
    let jwt = Error::from(dereference::Error::NoJwtSecret {
        name: "jwt".to_owned(),
        key: "hmac".to_owned(),
    });
    assert_eq!(
        condition(&jwt).map(|c| c.3),
        Some("Secret jwt with key hmac (auth.jwtSecretRef) not found".to_owned())
    );
    let read = Error::from(dereference::Error::ReadSecret {
        name: "pg-admin".to_owned(),
        source: api_error(500),
    });
    assert_eq!(read.reason(), "KubernetesApiError");
    assert_eq!(condition(&read), None);

    let unreachable = Error::from(dereference::Error::Unreachable {
        first: ProvisionError::Redis("connection refused".to_owned()),
        rest: vec![ProvisionError::Timeout {
            dependency: "PostgreSQL",
            timeout: Duration::from_secs(3),
        }],
    });
    assert_eq!(unreachable.reason(), "RedisUnavailable");
    assert_eq!(
        condition(&unreachable),
        Some((
            conditions::DEPENDENCIES_READY,
            Status::False,
            "RedisUnavailable".to_owned(),
            "Redis: connection refused; PostgreSQL did not answer within 3s".to_owned()
        ))
    );

    let topics = Error::from(provision::Error::Topics(ProvisionError::Kafka(
        "broker down".to_owned(),
    )));
    assert_eq!(topics.reason(), "KafkaUnavailable");
    assert_eq!(
        condition(&topics),
        Some((
            conditions::TOPICS_READY,
            Status::False,
            "KafkaUnavailable".to_owned(),
            "Kafka: broker down".to_owned()
        ))
    );
    let role = Error::from(provision::Error::PostgresRole {
        role: "mws_a".to_owned(),
        source: ProvisionError::Postgres("denied".to_owned()),
    });
    assert_eq!(role.reason(), "PostgresUnavailable");
    assert_eq!(
        condition(&role).map(|c| (c.0, c.3)),
        Some((
            conditions::CREDENTIALS_READY,
            "PostgreSQL: denied".to_owned()
        ))
    );
    let secret = Error::from(provision::Error::ConnectionSecret(apply::Error::Patch {
        key: "v1/Secret/a/a-redis".to_owned(),
        source: api_error(500),
    }));
    assert_eq!(secret.reason(), "KubernetesApiError");
    assert_eq!(condition(&secret), None);

    let caches = Error::from(stages::Error::CachesNotSynced);
    assert_eq!(caches.reason(), "CachesNotSynced");
    assert_eq!(
        condition(&caches),
        Some((
            conditions::DEPENDENCIES_READY,
            Status::False,
            "CachesNotSynced".to_owned(),
            "the operator's caches are not synced yet".to_owned()
        ))
    );
    let applied = Error::from(stages::Error::Apply {
        component: crate::build::Component::Gateway,
        source: apply::Error::Patch {
            key: "apps/v1/Deployment/a/a-api-gateway".to_owned(),
            source: api_error(422),
        },
    });
    assert_eq!(applied.reason(), "ApplyFailed");
    let (stage, status, reason, message) = condition(&applied).unwrap();
    assert_eq!(
        (stage, status, reason.as_str()),
        (conditions::EDGE_AVAILABLE, Status::False, "ApplyFailed")
    );
    assert!(
        message.starts_with("Kubernetes API request failed: ApiError: "),
        "{message}"
    );
    let disabled = Error::from(stages::Error::DeleteDisabled {
        component: crate::build::Component::WsHub,
        source: api_error(500),
    });
    assert_eq!(disabled.reason(), "KubernetesApiError");
    assert_eq!(condition(&disabled), None);

    let status = Error::from(status::Error::Patch {
        namespace: "a".to_owned(),
        name: "a".to_owned(),
        source: api_error(500),
    });
    assert_eq!(status.reason(), "KubernetesApiError");
}

#[test]
fn an_error_displays_with_every_cause() {
    let error = Error::from(dereference::Error::ReadSecret {
        name: "pg-admin".to_owned(),
        source: api_error(500),
    });
    let text = Chain(&error).to_string();
    assert!(
        text.starts_with(
            "failed to dereference the stack's Secrets and dependencies: \
             failed to read Secret pg-admin: ApiError: the server refused"
        ),
        "{text}"
    );
}

#[test]
fn topics_the_broker_refuses_fail_the_stack_other_stage_failures_do_not() {
    let stack = crate::fixtures::example();
    let refused = [Report::new(
        crate::status::TOPICS_READY,
        crate::status::Status::False,
        provision::INVALID_TOPIC_CONFIG,
        "the broker refused to create topic t: Broker: Configuration is invalid",
    )];
    assert_eq!(status::phase(&stack, &refused), Phase::Failed);
    let unavailable = [Report::new(
        crate::status::TOPICS_READY,
        crate::status::Status::False,
        "KafkaUnavailable",
        "no broker in the metadata",
    )];
    assert_eq!(status::phase(&stack, &unavailable), Phase::Progressing);
}

#[test]
fn provisioning_is_redone_sooner_for_services_that_lost_readiness_than_for_a_rollout() {
    use provision::{DEGRADED_REUSE, ROLLOUT_REUSE, reuse_for};
    let resync = Duration::from_secs(300);
    assert_eq!(reuse_for(false, false, resync), resync, "all ready");
    assert_eq!(reuse_for(false, true, resync), resync, "all ready");
    assert_eq!(
        reuse_for(true, true, resync),
        DEGRADED_REUSE,
        "lost readiness"
    );
    assert_eq!(
        reuse_for(true, false, resync),
        ROLLOUT_REUSE,
        "first rollout"
    );
    let short = Duration::from_secs(5);
    assert_eq!(
        reuse_for(true, false, short),
        short,
        "never past the resync"
    );
    assert_eq!(reuse_for(true, true, short), short, "never past the resync");
}
