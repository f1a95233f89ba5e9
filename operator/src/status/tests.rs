use super::*;

fn time(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
}

fn stages(statuses: [Status; 5]) -> Vec<Report> {
    STAGES
        .iter()
        .zip(statuses)
        .map(|(t, s)| Report::new(t, s, format!("{t}Reason"), format!("{t} message")))
        .collect()
}

#[test]
fn ready_is_true_only_when_every_stage_is_and_names_the_first_blocker() {
    let all = with_ready(stages([Status::True; 5]));
    assert_eq!(all.last().unwrap().status, Status::True);
    let blocked = with_ready(stages([
        Status::True,
        Status::False,
        Status::Unknown,
        Status::Unknown,
        Status::Unknown,
    ]));
    let ready = blocked.last().unwrap();
    assert_eq!(
        (ready.type_, ready.status, ready.reason.as_str()),
        (READY, Status::False, "TopicsReadyReason")
    );
    assert_eq!(ready.message, "TopicsReady: TopicsReady message");
}

#[test]
fn merge_keeps_the_transition_time_unless_the_status_changes() {
    let first = with_ready(stages([
        Status::True,
        Status::True,
        Status::False,
        Status::Unknown,
        Status::Unknown,
    ]));
    let (conditions, transitions) = merge(&[], &first, Some(1), &time(100));
    assert_eq!(conditions.len(), 6);
    assert_eq!(transitions.len(), 6, "every new condition is a transition");
    assert!(transitions.iter().all(|t| t.from.is_none()));

    // Same statuses, other messages, later: nothing transitions, times stay.
    let mut again = first.clone();
    again[2].message = "still provisioning".to_owned();
    let (unchanged, transitions) = merge(&conditions, &again, Some(2), &time(200));
    assert!(transitions.is_empty());
    assert!(
        unchanged
            .iter()
            .all(|c| c.last_transition_time == time(100))
    );
    assert_eq!(unchanged[2].message, "still provisioning");
    assert_eq!(unchanged[2].observed_generation, Some(2));

    // Credentials become True: that condition (and nothing else) moves to the new time.
    let later = with_ready(stages([
        Status::True,
        Status::True,
        Status::True,
        Status::Unknown,
        Status::Unknown,
    ]));
    let (moved, transitions) = merge(&unchanged, &later, Some(2), &time(300));
    assert_eq!(transitions.len(), 1);
    assert_eq!(transitions[0].type_, CREDENTIALS_READY);
    assert_eq!(transitions[0].from.as_deref(), Some("False"));
    assert_eq!(moved[2].last_transition_time, time(300));
    assert_eq!(moved[0].last_transition_time, time(100));
}

#[test]
fn merge_keeps_conditions_that_were_not_reported() {
    let (conditions, _) = merge(
        &[],
        &with_ready(stages([Status::True; 5])),
        Some(1),
        &time(1),
    );
    let only_ready = [Report::new(
        READY,
        Status::False,
        "Paused",
        "spec.paused is true",
    )];
    let (merged, transitions) = merge(&conditions, &only_ready, Some(2), &time(2));
    assert_eq!(merged.len(), 6);
    assert_eq!(transitions.len(), 1);
    assert_eq!(merged[0].type_, READY);
    assert_eq!(merged[0].reason, "Paused");
}

#[test]
fn only_transitions_that_are_news_make_events() {
    let transition = |from: Option<&str>, status: &str, reason: &str| Transition {
        type_: CORE_AVAILABLE.to_owned(),
        from: from.map(str::to_owned),
        to: Condition {
            type_: CORE_AVAILABLE.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: String::new(),
            last_transition_time: time(0),
            observed_generation: None,
        },
    };
    // A new stack's stages waiting and rolling out: no Event.
    assert!(!transition(None, "Unknown", "Waiting").is_news());
    assert!(!transition(None, "False", "Progressing").is_news());
    assert!(!transition(Some("Unknown"), "False", "Progressing").is_news());
    // Becoming True, failing, or losing True: an Event.
    assert!(transition(None, "True", "Available").is_news());
    assert!(transition(Some("False"), "True", "Available").is_news());
    assert!(transition(None, "False", "RedisUnavailable").is_news());
    assert!(transition(Some("True"), "False", "Progressing").is_news());
    assert!(transition(Some("True"), "Unknown", "Waiting").is_news());
}
