use std::sync::Arc;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tokio_rustls::rustls::RootCertStore;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::ServerCertVerifier as _;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::*;

fn names() -> Vec<String> {
    vec![
        "meridian-operator-webhook.meridian-system.svc".to_owned(),
        "127.0.0.1".to_owned(),
    ]
}

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn life() -> Lifetimes {
    Lifetimes::default()
}

/// Whether a client trusting `ca_bundle` accepts `tls_crt` for `name` at `at`.
fn verifies(ca_bundle: &str, tls_crt: &str, name: &str, at: Timestamp) -> bool {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_bundle.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(default_provider()))
            .build()
            .unwrap();
    let leaf = CertificateDer::from_pem_slice(tls_crt.as_bytes()).unwrap();
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(at.as_second()).unwrap(),
    ));
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            at,
        )
        .is_ok()
}

fn issued() -> Bundle {
    execute(Plan::Issue, None, &names(), now(), life()).unwrap()
}

#[test]
fn nothing_stored_issues_a_ca_and_a_certificate_for_every_name() {
    assert_eq!(plan(None, &names(), now(), life()), Plan::Issue);
    let bundle = issued();
    for name in names() {
        assert!(
            verifies(&bundle.ca_crt, &bundle.tls_crt, &name, now()),
            "{name}"
        );
    }
    assert!(!verifies(
        &bundle.ca_crt,
        &bundle.tls_crt,
        "elsewhere.example",
        now()
    ));
    assert_eq!(
        bundle.cert_not_after,
        now() + SignedDuration::from_hours(90 * 24)
    );
}

#[test]
fn a_fresh_bundle_is_kept_and_survives_the_secret() {
    let bundle = issued();
    let later = now() + SignedDuration::from_hours(24 * 30);
    assert_eq!(plan(Some(&bundle), &names(), later, life()), Plan::Keep);
    let (data, annotations) = bundle.to_secret();
    assert_eq!(
        Bundle::from_secret(&data, &annotations),
        Some(bundle.clone())
    );
    let mut partial = data.clone();
    partial.remove(TLS_KEY);
    assert_eq!(Bundle::from_secret(&partial, &annotations), None);
}

#[test]
fn the_certificate_is_renewed_with_a_third_of_its_life_left_from_the_same_ca() {
    let bundle = issued();
    let due = now() + SignedDuration::from_hours(61 * 24);
    assert_eq!(plan(Some(&bundle), &names(), due, life()), Plan::RenewLeaf);
    let renewed = execute(Plan::RenewLeaf, Some(&bundle), &names(), due, life()).unwrap();
    assert_eq!(renewed.ca_crt, bundle.ca_crt);
    assert_ne!(renewed.tls_crt, bundle.tls_crt);
    assert!(verifies(&bundle.ca_crt, &renewed.tls_crt, "127.0.0.1", due));
    assert!(renewed.cert_not_after > bundle.cert_not_after);
}

#[test]
fn new_names_renew_the_certificate() {
    let bundle = issued();
    let moved = vec!["meridian-operator-webhook.ops.svc".to_owned()];
    assert_eq!(plan(Some(&bundle), &moved, now(), life()), Plan::RenewLeaf);
}

#[test]
fn a_renewed_ca_is_trusted_next_to_the_previous_one() {
    let bundle = issued();
    let due = now() + SignedDuration::from_hours(4 * 365 * 24);
    assert_eq!(plan(Some(&bundle), &names(), due, life()), Plan::RenewCa);
    let renewed = execute(Plan::RenewCa, Some(&bundle), &names(), due, life()).unwrap();
    assert_eq!(renewed.ca_crt.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(renewed.ca_crt.ends_with(&bundle.ca_crt));
    // A replica still serving a certificate of the previous CA is trusted...
    let old_leaf = execute(Plan::RenewLeaf, Some(&bundle), &names(), due, life()).unwrap();
    assert!(verifies(
        &renewed.ca_crt,
        &old_leaf.tls_crt,
        "127.0.0.1",
        due
    ));
    // ... and so is the new certificate, which the previous CA alone does not vouch for.
    assert!(verifies(
        &renewed.ca_crt,
        &renewed.tls_crt,
        "127.0.0.1",
        due
    ));
    assert!(!verifies(
        &bundle.ca_crt,
        &renewed.tls_crt,
        "127.0.0.1",
        due
    ));
    // The next renewal drops the CA before the previous one.
    let next = execute(Plan::RenewCa, Some(&renewed), &names(), due, life()).unwrap();
    assert_eq!(next.ca_crt.matches("BEGIN CERTIFICATE").count(), 2);
}

#[test]
fn the_bundle_never_shows_its_keys_in_debug_output() {
    let bundle = issued();
    let shown = format!("{bundle:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
}
