//! Integration tests of the operator against the real local control plane (`just deps-up`):
//! kube-apiserver, kube-controller-manager and kube-scheduler built from source, with kwok
//! playing the kubelet.
#![allow(clippy::unwrap_used, clippy::panic)] // test code: failing loudly is the point

mod admission;
mod built_objects;
mod control_plane;
mod conversion;
mod e2e;
mod plugin;
mod provision;
mod reconcile;
