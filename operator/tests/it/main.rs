//! Integration tests of the operator against the real local control plane (`just deps-up`):
//! kube-apiserver, kube-controller-manager and kube-scheduler built from source, with kwok
//! playing the kubelet.

mod admission;
mod built_objects;
mod control_plane;
