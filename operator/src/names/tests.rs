use super::*;
use crate::fixtures;

fn stack(namespace: &str, name: &str) -> ValidatedStack {
    let mut stack = fixtures::example();
    stack.metadata.namespace = Some(namespace.to_owned());
    stack.metadata.name = Some(name.to_owned());
    fixtures::validated(&stack)
}

#[test]
fn names_derive_from_the_namespace_and_the_stack_name() {
    let stack = stack("demo-ns", "demo");
    assert_eq!(topic(&stack, "events"), "demo-ns.demo.events");
    assert_eq!(redis_user(&stack), "meridian:demo-ns:demo");
    assert_eq!(postgres_role(&stack), "mws_demo_ns_demo");
    assert_eq!(postgres_database(&stack), "mws_demo_ns_demo");
}

#[test]
fn long_postgres_names_are_truncated_with_a_hash_and_stay_distinct() {
    let namespace = "a-very-long-namespace-name-that-goes-on-and-on";
    let one = postgres_role(&stack(namespace, "first-stack-with-a-long-name"));
    let two = postgres_role(&stack(namespace, "first-stack-with-a-long-name2"));
    assert_eq!(one.len(), 63);
    assert_eq!(two.len(), 63);
    assert_ne!(one, two);
    assert!(one.starts_with("mws_a_very_long_namespace"));
    assert!(one.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
}
