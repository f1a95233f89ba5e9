use super::*;
use Decision::{Paused, Proceed, WaitFor};
use Step::*;

fn all_enabled() -> BTreeSet<Component> {
    Component::ALL.into_iter().collect()
}

fn observed(deps: bool, topics: bool, creds: bool, available: &[Component]) -> Observed {
    Observed {
        dependencies_reachable: deps,
        topics_reconciled: topics,
        credentials_provisioned: creds,
        available: available.iter().copied().collect(),
    }
}

const CORE: [Component; 3] = [
    Component::CommandService,
    Component::Processor,
    Component::CacheUpdater,
];

#[test]
fn each_step_waits_for_the_first_unhealthy_step_before_it() {
    use Component as C;
    let cases: Vec<(&str, Observed, [Decision; 6])> = vec![
        (
            "nothing observed yet: only the dependency check proceeds",
            observed(false, false, false, &[]),
            [
                Proceed,
                WaitFor(Dependencies),
                WaitFor(Dependencies),
                WaitFor(Dependencies),
                WaitFor(Dependencies),
                WaitFor(Dependencies),
            ],
        ),
        (
            "dependencies up: topics proceed, credentials wait for topics",
            observed(true, false, false, &[]),
            [
                Proceed,
                Proceed,
                WaitFor(Topics),
                WaitFor(Topics),
                WaitFor(Topics),
                WaitFor(Topics),
            ],
        ),
        (
            "topics done: credentials proceed",
            observed(true, true, false, &[]),
            [
                Proceed,
                Proceed,
                Proceed,
                WaitFor(Credentials),
                WaitFor(Credentials),
                WaitFor(Credentials),
            ],
        ),
        (
            "credentials done: core proceeds, edge waits for the core",
            observed(true, true, true, &[]),
            [
                Proceed,
                Proceed,
                Proceed,
                Proceed,
                WaitFor(Core),
                WaitFor(Core),
            ],
        ),
        (
            "core partly available: edge still waits",
            observed(true, true, true, &[C::CommandService, C::Processor]),
            [
                Proceed,
                Proceed,
                Proceed,
                Proceed,
                WaitFor(Core),
                WaitFor(Core),
            ],
        ),
        (
            "core available: the hub proceeds, the gateway waits for the hub",
            observed(
                true,
                true,
                true,
                &[C::CommandService, C::Processor, C::CacheUpdater],
            ),
            [Proceed, Proceed, Proceed, Proceed, Proceed, WaitFor(WsHub)],
        ),
        (
            "hub available: the gateway proceeds",
            observed(
                true,
                true,
                true,
                &[C::CommandService, C::Processor, C::CacheUpdater, C::WsHub],
            ),
            [Proceed; 6],
        ),
        (
            "a dependency lost later: everything after it waits again",
            observed(false, true, true, &Component::ALL),
            [
                Proceed,
                WaitFor(Dependencies),
                WaitFor(Dependencies),
                WaitFor(Dependencies),
                WaitFor(Dependencies),
                WaitFor(Dependencies),
            ],
        ),
    ];
    for (case, observed, expected) in cases {
        let decisions: Vec<Decision> = plan(&all_enabled(), &observed, false)
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        assert_eq!(decisions, expected, "{case}");
    }
}

#[test]
fn the_plan_lists_the_steps_in_stage_order() {
    let steps: Vec<Step> = plan(&all_enabled(), &Observed::default(), false)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, Step::ALL);
}

#[test]
fn a_paused_stack_proceeds_with_nothing_even_when_healthy() {
    let healthy = observed(true, true, true, &Component::ALL);
    for (step, decision) in plan(&all_enabled(), &healthy, true) {
        assert_eq!(decision, Paused, "{step:?}");
    }
}

#[test]
fn the_gateway_never_proceeds_before_the_core_is_available() {
    // Every combination of core availability, with everything else healthy.
    for mask in 0..8u8 {
        let available: Vec<Component> = CORE
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, c)| *c)
            .chain([Component::WsHub])
            .collect();
        let plan = plan(
            &all_enabled(),
            &observed(true, true, true, &available),
            false,
        );
        let gateway = plan.iter().find(|(s, _)| *s == Gateway).unwrap().1;
        let core_available = mask == 0b111;
        assert_eq!(gateway == Proceed, core_available, "core mask {mask:03b}");
    }
}

#[test]
fn disabled_services_are_not_waited_for() {
    let enabled: BTreeSet<Component> = CORE.into_iter().chain([Component::Gateway]).collect();
    // The hub is disabled: the gateway proceeds as soon as the core is available.
    let decisions = plan(&enabled, &observed(true, true, true, &CORE), false);
    assert_eq!(decisions.last(), Some(&(Gateway, Proceed)));

    // The processor is disabled: the core is healthy without it.
    let enabled: BTreeSet<Component> = Component::ALL
        .into_iter()
        .filter(|c| *c != Component::Processor)
        .collect();
    let available = [Component::CommandService, Component::CacheUpdater];
    assert!(healthy(
        Core,
        &enabled,
        &observed(true, true, true, &available)
    ));
}
