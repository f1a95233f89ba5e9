//! Admission of `MiddlewareStack` objects by the real API server: the generated CRD installs,
//! the checked-in example is accepted, and invalid specs and unsafe updates are rejected with
//! the OpenAPI or CEL message a user understands.
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt as _};
use operator::crd::MiddlewareStack;
use serde_json::{Value, json};

const FIELD_MANAGER: &str = "meridian-tests";
const EXAMPLE: &str = include_str!("../../../crds/example-stack.yaml");

pub(crate) async fn client() -> Client {
    Client::try_default()
        .await
        .expect("no usable KUBECONFIG: run `just deps-up` and `source` the env file it prints")
}

/// Installs (or updates) the CRD by server-side apply and waits until it is Established.
pub(crate) async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crd = operator::crd().expect("the CRD renders");
    // Where conversions go is the conversion test's to set (with its own webhook, at a URL);
    // this apply leaves `spec.conversion` to it.
    crd.spec.conversion = None;
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("the API server rejected the generated CRD");
    let established = await_condition(crds, &name, conditions::is_crd_established());
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .expect("the CRD was not Established within 30 s")
        .expect("watching the CRD failed");
}

/// A fresh namespace for one test; `delete` removes it again.
pub(crate) struct TestNamespace {
    client: Client,
    pub(crate) name: String,
}

impl TestNamespace {
    pub(crate) async fn create(client: &Client, prefix: &str) -> Self {
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace =
            serde_json::from_value(json!({ "metadata": { "name": name } })).expect("a Namespace");
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .expect("failed to create the test namespace");
        Self {
            client: client.clone(),
            name,
        }
    }

    pub(crate) fn stacks(&self) -> Api<MiddlewareStack> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub(crate) async fn delete(self) {
        let namespaces: Api<Namespace> = Api::all(self.client);
        namespaces
            .delete(&self.name, &DeleteParams::default())
            .await
            .expect("failed to delete the test namespace");
    }
}

/// The documents of `crds/example-stack.yaml`: the admin Secrets, then the stack.
fn example_documents() -> Vec<Value> {
    serde_saphyr::from_multiple(EXAMPLE).expect("crds/example-stack.yaml is valid YAML")
}

/// The example stack as JSON, renamed.
pub(crate) fn example_stack(name: &str) -> Value {
    let mut stack = example_documents()
        .into_iter()
        .find(|d| d["kind"] == "MiddlewareStack")
        .expect("crds/example-stack.yaml holds a MiddlewareStack");
    stack["metadata"] = json!({ "name": name });
    stack
}

/// Applies `stack` by server-side apply as the test field manager.
pub(crate) async fn apply(
    stacks: &Api<MiddlewareStack>,
    stack: &Value,
) -> Result<MiddlewareStack, kube::Error> {
    let name = stack["metadata"]["name"]
        .as_str()
        .expect("the stack has a name");
    stacks
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(stack),
        )
        .await
}

/// Asserts that the API server refused `result` as invalid with a message containing `expected`.
fn assert_rejected(case: &str, result: Result<MiddlewareStack, kube::Error>, expected: &str) {
    let status = match &result {
        Err(kube::Error::Api(status)) => Some(status),
        _ => None,
    };
    assert!(
        status.is_some(),
        "{case}: expected a rejection by the API server, got {:?}",
        result.map(|stack| stack.name_any())
    );
    let status = status.expect("checked above");
    assert_eq!(status.code, 422, "{case}: not 422 Invalid: {status:?}");
    assert!(
        status.message.contains(expected),
        "{case}: the message does not say `{expected}`: {}",
        status.message
    );
}

#[tokio::test]
async fn the_example_stack_and_its_secrets_are_accepted_with_defaults_filled_in() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "admission-ok").await;

    for document in example_documents() {
        let gvk = kube::core::GroupVersionKind::try_from(&kube::core::TypeMeta {
            api_version: document["apiVersion"].as_str().unwrap().to_owned(),
            kind: document["kind"].as_str().unwrap().to_owned(),
        })
        .unwrap();
        let (resource, _) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);
        let name = document["metadata"]["name"].as_str().unwrap();
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&document),
        )
        .await
        .unwrap_or_else(|e| panic!("{} {name} was rejected: {e}", gvk.kind));
    }

    let stack = ns.stacks().get("demo").await.unwrap();
    assert_eq!(stack.spec.postgres.database, "middleware");
    assert_eq!(stack.spec.kafka.topics.events.partitions, 6);
    // Fields the example leaves out come back with the schema's defaults.
    assert!(stack.spec.services.cache_updater.enabled);
    assert_eq!(stack.spec.services.cache_updater.replicas, 1);

    // No `image`: the operator's release decides.
    let mut minimal = example_stack("minimal");
    minimal["spec"].as_object_mut().unwrap().remove("image");
    let minimal = apply(&ns.stacks(), &minimal).await.unwrap();
    assert_eq!(minimal.spec.image, operator::crd::ImageSpec::default());
    ns.delete().await;
}

#[tokio::test]
async fn invalid_specs_are_rejected_at_admission_with_a_message_a_user_understands() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "admission-invalid").await;
    let stacks = ns.stacks();

    type Mutation = fn(&mut Value);
    let cases: [(&str, Mutation, &str); 22] = [
        (
            "negative replicas",
            |s| s["spec"]["services"]["processor"]["replicas"] = json!(-1),
            "spec.services.processor.replicas in body should be greater than or equal to 0",
        ),
        (
            "zero partitions",
            |s| s["spec"]["kafka"]["topics"]["commands"]["partitions"] = json!(0),
            "spec.kafka.topics.commands.partitions in body should be greater than or equal to 1",
        ),
        (
            "zero replication factor",
            |s| s["spec"]["kafka"]["topics"]["cache"]["replicationFactor"] = json!(0),
            "replicationFactor in body should be greater than or equal to 1",
        ),
        (
            "both jwtSecretRef and jwksUrl",
            |s| s["spec"]["auth"]["jwksUrl"] = json!("https://auth.example.invalid/jwks.json"),
            "auth.jwtSecretRef and auth.jwksUrl are mutually exclusive: set only one",
        ),
        (
            "neither jwtSecretRef nor jwksUrl",
            |s| {
                s["spec"]["auth"]
                    .as_object_mut()
                    .unwrap()
                    .remove("jwtSecretRef");
            },
            "auth needs either jwtSecretRef or jwksUrl",
        ),
        (
            "a port above 65535",
            |s| s["spec"]["postgres"]["port"] = json!(70000),
            "spec.postgres.port in body should be less than or equal to 65535",
        ),
        (
            "a sampling ratio above 1",
            |s| s["spec"]["telemetry"]["samplingRatio"] = json!(1.5),
            "spec.telemetry.samplingRatio in body should be less than or equal to 1",
        ),
        (
            "credentials in the Redis URL",
            |s| s["spec"]["redis"]["url"] = json!("redis://admin:hunter2@127.0.0.1:6379"),
            "redis.url must not contain credentials",
        ),
        (
            "100000 replicas",
            |s| s["spec"]["services"]["gateway"]["replicas"] = json!(100_000),
            "spec.services.gateway.replicas in body should be less than or equal to 500",
        ),
        (
            "no processor replica",
            |s| s["spec"]["services"]["processor"]["replicas"] = json!(0),
            "services.processor.replicas must be at least 1 while it is enabled",
        ),
        (
            "a registry with a scheme and a space",
            |s| s["spec"]["image"]["registry"] = json!("https://ghcr.io/Example Org/meridian"),
            "image.registry must be a registry host and path such as ghcr.io/example/meridian",
        ),
        (
            "a service's tag with a space",
            |s| s["spec"]["services"]["hub"]["image"] = json!({ "tag": "1.0 beta" }),
            "image.tag must be letters, digits",
        ),
        (
            "a lag target on the gateway",
            |s| {
                s["spec"]["services"]["gateway"]["autoscaling"] =
                    json!({ "minReplicas": 1, "maxReplicas": 3, "targetLagPerReplica": 100 });
            },
            "autoscaling.targetLagPerReplica applies to the processor and the cache updater",
        ),
        (
            "a connections target on the gateway",
            |s| {
                s["spec"]["services"]["gateway"]["autoscaling"] = json!({
                    "minReplicas": 1, "maxReplicas": 3, "targetConnectionsPerReplica": 100
                });
            },
            "autoscaling.targetConnectionsPerReplica applies to the hub",
        ),
        (
            "a scale-down delay of two hours",
            |s| {
                s["spec"]["services"]["processor"]["autoscaling"] =
                    json!({ "minReplicas": 1, "maxReplicas": 3, "scaleDownDelaySeconds": 7200 });
            },
            "scaleDownDelaySeconds",
        ),
        (
            "fewer max than min replicas",
            |s| {
                s["spec"]["services"]["gateway"]["autoscaling"] =
                    json!({ "minReplicas": 3, "maxReplicas": 2 });
            },
            "autoscaling.maxReplicas must be at least autoscaling.minReplicas",
        ),
        (
            "a stack principal without an admin login",
            |s| s["spec"]["kafka"]["servicePrincipal"] = json!("Stack"),
            "kafka.servicePrincipal: Stack needs kafka.adminSecretRef",
        ),
        (
            "an unknown SASL mechanism",
            |s| s["spec"]["kafka"]["adminMechanism"] = json!("GSSAPI"),
            "spec.kafka.adminMechanism: Unsupported value: \"GSSAPI\"",
        ),
        (
            "a dot in the name",
            |s| s["metadata"]["name"] = json!("orders.v2"),
            "metadata.name must be a DNS-1035 label",
        ),
        (
            "a Redis CA with a redis:// url",
            |s| s["spec"]["redis"]["caSecretRef"] = json!({"name": "redis-ca", "key": "ca.crt"}),
            "redis.caSecretRef needs a rediss:// url",
        ),
        (
            "a PostgreSQL CA with sslMode disable",
            |s| s["spec"]["postgres"]["caSecretRef"] = json!({"name": "pg-ca", "key": "ca.crt"}),
            "postgres.caSecretRef needs TLS: it cannot go with sslMode disable",
        ),
        (
            "a 48-character name",
            |s| s["metadata"]["name"] = json!("a".repeat(48)),
            "metadata.name must be at most 47 characters",
        ),
    ];
    for (i, (case, mutate, expected)) in cases.into_iter().enumerate() {
        let mut stack = example_stack(&format!("invalid-{i}"));
        mutate(&mut stack);
        assert_rejected(case, apply(&stacks, &stack).await, expected);
    }
    let accepted = [
        "meridian",
        "localhost:5000/meridian",
        "ghcr.io/example-org/meridian",
        "Registry.Example.com:443/team/sub_path/meridian/",
    ];
    for (i, registry) in accepted.into_iter().enumerate() {
        let mut stack = example_stack(&format!("registry-{i}"));
        stack["spec"]["image"]["registry"] = json!(registry);
        stack["spec"]["services"]["processor"]["enabled"] = json!(false);
        stack["spec"]["services"]["processor"]["replicas"] = json!(0);
        stack["metadata"]["name"] = json!(format!("{}{i}", "b".repeat(46)));
        let result = apply(&stacks, &stack).await;
        assert!(result.is_ok(), "{registry} refused: {result:?}");
    }
    // The CAs where they apply: a rediss:// url, TLS to PostgreSQL.
    let mut stack = example_stack("with-cas");
    stack["spec"]["redis"]["url"] = json!("rediss://127.0.0.1:6380");
    stack["spec"]["redis"]["caSecretRef"] = json!({"name": "redis-ca", "key": "ca.crt"});
    stack["spec"]["postgres"]["sslMode"] = json!("verify-full");
    stack["spec"]["postgres"]["caSecretRef"] = json!({"name": "pg-ca", "key": "ca.crt"});
    let result = apply(&stacks, &stack).await;
    assert!(result.is_ok(), "CAs refused: {result:?}");
    ns.delete().await;
}

#[tokio::test]
async fn unsafe_updates_are_rejected_and_safe_ones_accepted() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "admission-update").await;
    let stacks = ns.stacks();
    let original = example_stack("update");
    apply(&stacks, &original).await.unwrap();

    type Mutation = fn(&mut Value);
    let rejected: [(&str, Mutation, &str); 3] = [
        (
            "decreasing partitions",
            |s| s["spec"]["kafka"]["topics"]["events"]["partitions"] = json!(2),
            "partitions may not be decreased: Kafka cannot remove partitions from a topic",
        ),
        (
            "changing postgres.database",
            |s| s["spec"]["postgres"]["database"] = json!("elsewhere"),
            "postgres.database is immutable: moving a stack to another database would abandon its data",
        ),
        (
            "changing a topic's replication factor",
            |s| s["spec"]["kafka"]["topics"]["commands"]["replicationFactor"] = json!(3),
            "replicationFactor is immutable: the operator does not reassign partitions",
        ),
    ];
    for (case, mutate, expected) in rejected {
        let mut stack = original.clone();
        mutate(&mut stack);
        assert_rejected(case, apply(&stacks, &stack).await, expected);
    }

    // Growing a topic and scaling a service are fine.
    let mut grown = original.clone();
    grown["spec"]["kafka"]["topics"]["events"]["partitions"] = json!(12);
    grown["spec"]["services"]["processor"]["replicas"] = json!(3);
    let stack = apply(&stacks, &grown).await.unwrap();
    assert_eq!(stack.spec.kafka.topics.events.partitions, 12);
    assert_eq!(stack.spec.services.processor.replicas, 3);
    ns.delete().await;
}

#[tokio::test]
async fn kubectl_apply_of_an_invalid_manifest_prints_the_cel_message() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "admission-kubectl").await;

    let mut stack = example_stack("both-auth-modes");
    stack["spec"]["auth"]["jwksUrl"] = json!("https://auth.example.invalid/jwks.json");
    let dir = std::env::temp_dir().join(format!("meridian-{}", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("invalid-stack.yaml");
    std::fs::write(&manifest, serde_saphyr::to_string(&stack).unwrap()).unwrap();

    let out = tokio::process::Command::new("kubectl")
        .args(["apply", "--namespace", &ns.name, "-f"])
        .arg(&manifest)
        .output()
        .await
        .expect("kubectl on PATH (the env file from `just deps-up` puts the built one first)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kubectl accepted an invalid stack");
    assert!(
        stderr.contains("auth.jwtSecretRef and auth.jwksUrl are mutually exclusive: set only one"),
        "kubectl's stderr lacks the CEL message: {stderr}"
    );

    std::fs::remove_dir_all(&dir).unwrap();
    ns.delete().await;
}
