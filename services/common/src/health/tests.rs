use super::*;

struct Fixed(&'static str, Result<(), &'static str>);

impl Check for Fixed {
    fn name(&self) -> &'static str {
        self.0
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let result = self.1.map_err(str::to_owned);
        Box::pin(async move { result })
    }
}

struct Hangs;

impl Check for Hangs {
    fn name(&self) -> &'static str {
        "kafka"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(futures::future::pending())
    }
}

fn up() -> DependencyState {
    DependencyState {
        status: DependencyStatus::Up,
        error: None,
        latency_ms: 1,
        required: true,
    }
}

fn down() -> DependencyState {
    DependencyState {
        status: DependencyStatus::Down,
        error: Some("refused".into()),
        latency_ms: 1,
        required: true,
    }
}

fn optional(state: DependencyState) -> DependencyState {
    DependencyState {
        required: false,
        ..state
    }
}

#[test]
fn ready_only_when_every_dependency_is_up() {
    let all_up = BTreeMap::from([("postgres", up()), ("redis", up())]);
    assert_eq!(
        ReadinessReport::aggregate("svc", false, all_up).status,
        "ready"
    );

    let one_down = BTreeMap::from([("postgres", up()), ("redis", down())]);
    assert_eq!(
        ReadinessReport::aggregate("svc", false, one_down).status,
        "not_ready"
    );
}

#[test]
fn an_optional_dependency_down_degrades_but_keeps_the_service_ready() {
    let degraded = BTreeMap::from([("postgres", up()), ("kafka", optional(down()))]);
    let report = ReadinessReport::aggregate("svc", false, degraded);
    assert_eq!(report.status, "degraded");
    assert!(report.is_ready());

    let both = BTreeMap::from([("postgres", down()), ("kafka", optional(down()))]);
    let report = ReadinessReport::aggregate("svc", false, both);
    assert_eq!(report.status, "not_ready");
    assert!(!report.is_ready());

    let optional_up = BTreeMap::from([("kafka", optional(up()))]);
    assert_eq!(
        ReadinessReport::aggregate("svc", false, optional_up).status,
        "ready"
    );
}

#[tokio::test]
async fn an_optional_check_is_reported_as_not_required() {
    let readiness = Readiness::new("svc", Duration::from_secs(1))
        .with(Fixed("postgres", Ok(())))
        .with_optional(Fixed("kafka", Err("broker down")));
    let json = serde_json::to_value(readiness.report().await).unwrap();
    assert_eq!(json["status"], "degraded");
    assert_eq!(json["dependencies"]["kafka"]["status"], "down");
    assert_eq!(json["dependencies"]["kafka"]["required"], false);
    assert_eq!(json["dependencies"]["postgres"]["required"], true);
}

#[test]
fn a_service_without_dependencies_is_ready() {
    assert!(ReadinessReport::aggregate("svc", false, BTreeMap::new()).is_ready());
}

#[test]
fn draining_wins_over_healthy_dependencies() {
    let all_up = BTreeMap::from([("postgres", up())]);
    let report = ReadinessReport::aggregate("svc", true, all_up);
    assert_eq!(report.status, "shutting_down");
    assert!(!report.is_ready());
}

#[tokio::test]
async fn report_names_the_failing_dependency_and_its_error() {
    let readiness = Readiness::new("svc", Duration::from_secs(1))
        .with(Fixed("postgres", Ok(())))
        .with(Fixed("redis", Err("connection refused")));
    let report = readiness.report().await;
    assert!(!report.is_ready());
    assert_eq!(report.dependencies["postgres"].status, DependencyStatus::Up);
    assert_eq!(
        report.dependencies["redis"].error.as_deref(),
        Some("connection refused")
    );

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["status"], "not_ready");
    assert_eq!(json["dependencies"]["redis"]["status"], "down");
}

#[tokio::test]
async fn a_hanging_check_times_out_instead_of_hanging_the_probe() {
    let readiness = Readiness::new("svc", Duration::from_millis(50)).with(Hangs);
    let report = tokio::time::timeout(Duration::from_secs(5), readiness.report())
        .await
        .unwrap();
    let kafka = &report.dependencies["kafka"];
    assert_eq!(kafka.status, DependencyStatus::Down);
    assert!(kafka.error.as_deref().unwrap().contains("timed out"));
}
