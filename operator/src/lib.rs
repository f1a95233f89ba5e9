//! The Meridian operator: reconciles `MiddlewareStack` resources into the platform's
//! Deployments, Services, Kafka topics, Redis ACL users and PostgreSQL roles.
//!
//! The crate is built against the oldest Kubernetes API it supports (`k8s-openapi` feature
//! `v1_33`). Its integration tests run against the real local control plane started by
//! `just deps-up` (etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok).
//!
//! # Layout
//! - `crd` — the `MiddlewareStack` types and their admission rules (no client code).
//! - `validate` — spec → `ValidatedStack`, or an error listing every broken rule.
//! - `build` — `ValidatedStack` → the desired Deployments, Services, ConfigMaps and
//!   PodDisruptionBudgets (pure).
//! - `gating` — which staged step may proceed given the observed health (pure).
//! - `names` — the names of a stack's topics, Redis user and PostgreSQL role (pure).
//! - `scaling` — how many replicas a consumer scaled on Kafka lag runs (pure).
//! - `status` — the stage conditions and how they merge (pure).
//! - `provision` — Kafka topics, the Redis ACL user, the PostgreSQL role and database.
//! - `owned` — the compact copies of owned objects that the reflector stores hold.
//! - `controller` — the kube-runtime `Controller` and the staged reconcile ([`run`]), one
//!   submodule per step: watch, dereference, provision, apply, stages, status, cleanup.
//! - `webhook` — the CRD conversion webhook: `v1alpha1` ⇄ `v1beta1` (pure), its HTTPS server,
//!   and its certificates (self-managed in a Secret, or mounted from cert-manager).
//! - `config` — the operator binary's environment ([`OperatorConfig`]).
//! - `main.rs` — the `meridian-operator` binary: leader election, `/metrics`, `/health`.
//! - `bin/crdgen.rs` — prints [`crd_yaml`] (`just crds` writes `crds/middlewarestack.yaml`).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use serde_json::Value;

pub mod build;
pub mod config;
pub mod controller;
pub mod crd;
pub mod gating;
pub mod names;
pub mod owned;
pub mod provision;
pub mod scaling;
pub mod status;
pub mod validate;
pub mod webhook;

pub use config::OperatorConfig;
pub use controller::{Settings, run};

#[cfg(test)]
mod fixtures;

/// The `MiddlewareStack` CRD, as installed in a cluster: `v1beta1` (the storage version,
/// generated from [`crd::MiddlewareStack`]) and `v1alpha1` (served, frozen as released in
/// `crd/v1alpha1.yaml`), converted by the operator's webhook ([`webhook`]) at the chart's
/// default Service (the chart and a local operator point it elsewhere).
///
/// The generated descriptions are reflowed: doc comments wrap at 100 columns, and
/// `kubectl explain` would otherwise print those line breaks verbatim. Paragraphs (blank
/// lines) are kept.
///
/// # Errors
/// When the generated CRD does not round-trip through JSON, or the frozen version does not
/// parse (bugs caught by the unit tests).
pub fn crd() -> Result<CustomResourceDefinition, CrdError> {
    use kube::CustomResourceExt as _;
    let mut generated = serde_json::to_value(crd::MiddlewareStack::crd())?;
    reflow_descriptions(&mut generated);
    let mut crd: CustomResourceDefinition = serde_json::from_value(generated)?;
    let v1alpha1: CustomResourceDefinitionVersion = serde_saphyr::from_str(crd::V1ALPHA1)?;
    crd.spec.versions.push(v1alpha1);
    crd.spec.conversion = Some(webhook::conversion(webhook::ClientConfig::default()));
    Ok(crd)
}

/// The CRD as the YAML document checked in at `crds/middlewarestack.yaml`.
///
/// # Errors
/// When the CRD cannot be rendered (a bug in the types).
pub fn crd_yaml() -> Result<String, CrdError> {
    Ok(serde_saphyr::to_string(&crd()?)?)
}

/// Why the CRD could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The generated CRD did not round-trip through JSON.
    #[error("failed to convert the CRD through JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The frozen `v1alpha1` version did not parse.
    #[error("failed to parse the frozen v1alpha1 version: {0}")]
    Frozen(#[from] serde_saphyr::Error),
    /// The YAML emitter failed.
    #[error("failed to serialize the CRD as YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
}

/// Joins the lines of each paragraph of every `description` below `value`.
fn reflow_descriptions(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                match child {
                    Value::String(text) if key == "description" => *text = reflow(text),
                    _ => reflow_descriptions(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}

fn reflow(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .split('\n')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflow_joins_wrapped_lines_and_keeps_paragraphs() {
        assert_eq!(reflow("one\ntwo\n\nthree\n four"), "one two\n\nthree four");
        assert_eq!(reflow("single line"), "single line");
    }

    #[test]
    fn the_installed_crd_has_no_wrapped_descriptions() {
        let crd = serde_json::to_string(&crd().unwrap()).unwrap();
        assert!(
            crd.contains("(for example `postgres`). The stack's services get their own database")
        );
    }
}
