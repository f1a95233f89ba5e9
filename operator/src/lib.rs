//! The Meridian operator: reconciles `MiddlewareStack` resources into the platform's
//! Deployments, Services, Kafka topics, Redis ACL users and PostgreSQL roles.
//!
//! The crate is built against the oldest Kubernetes API it supports (`k8s-openapi` feature
//! `v1_33`). Its integration tests run against the real local control plane started by
//! `just deps-up` (etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok).
