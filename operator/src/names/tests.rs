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
    let role = postgres_role(&stack);
    assert!(role.starts_with("mws_demo_ns_demo_"), "{role}");
    assert_eq!(role.len(), "mws_demo_ns_demo_".len() + 16);
    assert_eq!(postgres_database(&stack), role);
    // Pinned: a changed hash would give running stacks new, empty databases.
    assert_eq!(
        postgres_role(&self::stack("meridian-demo", "demo")),
        "mws_meridian_demo_demo_05b658ba457e0ff2"
    );
    let plain = self::stack("demo", "orders");
    assert_eq!(postgres_role(&plain), "mws_demo_orders");
    assert_eq!(postgres_second_login(&plain), "mwsr_demo_orders");
}

#[test]
fn postgres_names_of_different_stacks_never_collide() {
    // Each row: stacks whose `[a-z0-9_]` spelling is the same.
    let rows = [
        [("team-a", "orders"), ("team", "a-orders")],
        [("team", "a.orders"), ("team", "a-orders")],
        [("team-a", "orders"), ("team-a-orders", "x")],
    ];
    for row in rows {
        let [one, two] = row.map(|(ns, name)| stack(ns, name));
        assert_ne!(postgres_role(&one), postgres_role(&two), "{row:?}");
        assert_ne!(
            postgres_second_login(&one),
            postgres_second_login(&two),
            "{row:?}"
        );
    }
    // No stack's second login is another stack's role.
    let names = [("demo", "orders"), ("team-a", "orders"), ("mwsr", "x")];
    for (ns, name) in names {
        let second = postgres_second_login(&stack(ns, name));
        assert!(second.starts_with("mwsr_"), "{second}");
        for (ns, name) in names {
            assert_ne!(second, postgres_role(&stack(ns, name)));
        }
    }
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
    let second = postgres_second_login(&stack(namespace, "first-stack-with-a-long-name"));
    assert_eq!(second.len(), 63);
    assert!(second.starts_with("mwsr_a_very_long_namespace"));
    assert_ne!(
        second,
        postgres_second_login(&stack(namespace, "first-stack-with-a-long-name2"))
    );
}
