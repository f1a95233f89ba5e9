//! YAML fixtures for the unit tests: stacks as the API server would return them.
use crate::crd::MiddlewareStack;
use crate::validate::{ValidatedStack, validate};

/// `operator/tests/fixtures/minimal-stack.yaml`: only the required fields.
pub const MINIMAL: &str = include_str!("../tests/fixtures/minimal-stack.yaml");
/// `operator/tests/fixtures/edge-disabled-stack.yaml`: core services only, JWKS, OTLP.
pub const EDGE_DISABLED: &str = include_str!("../tests/fixtures/edge-disabled-stack.yaml");
/// `operator/tests/fixtures/invalid-stack.yaml`: breaks most rules at once.
pub const INVALID: &str = include_str!("../tests/fixtures/invalid-stack.yaml");
/// `crds/example-stack.yaml`: the documented example (Secrets, then the stack).
pub const EXAMPLE: &str = include_str!("../../crds/example-stack.yaml");

/// Parses the one `MiddlewareStack` in a (possibly multi-document) YAML file.
pub fn stack(yaml: &str) -> MiddlewareStack {
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).unwrap();
    let stack = documents
        .into_iter()
        .find(|d| d["kind"] == "MiddlewareStack")
        .expect("the fixture holds a MiddlewareStack");
    serde_json::from_value(stack).unwrap()
}

/// The checked-in example as if read from namespace `demo-ns`.
pub fn example() -> MiddlewareStack {
    let mut stack = stack(EXAMPLE);
    stack.metadata.namespace = Some("demo-ns".to_owned());
    stack.metadata.uid = Some("4a1c2d6e-0000-4000-8000-000000000001".to_owned());
    stack
}

/// A fixture that must validate.
pub fn validated(stack: &MiddlewareStack) -> ValidatedStack {
    validate(stack).unwrap_or_else(|e| panic!("the fixture is invalid: {e}"))
}
