//! Local stand-ins for Services: one TCP listener per `(namespace, service, port)` referenced
//! by a process's environment, forwarding each connection to a running process of a pod the
//! Service selects (round robin), as kube-proxy would.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::env::ServiceAddr;

/// The proxies and the processes they forward to.
pub struct Proxies {
    services: Store<Service>,
    pods: Store<Pod>,
    listeners: Mutex<BTreeMap<ServiceAddr, u16>>,
    /// Listen on the Service's own port when it is free (the demo: gateway on 8080).
    prefer_service_ports: bool,
    /// Pod uid → the local port its process listens on.
    backends: Mutex<HashMap<String, u16>>,
    next: AtomicUsize,
    shutdown: CancellationToken,
}

impl Proxies {
    /// No proxies yet; they are created on first reference.
    pub fn new(
        services: Store<Service>,
        pods: Store<Pod>,
        prefer_service_ports: bool,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            services,
            pods,
            listeners: Mutex::new(BTreeMap::new()),
            prefer_service_ports,
            backends: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            shutdown,
        })
    }

    /// `127.0.0.1:<port>` of the proxy for `addr`, started on first use.
    pub fn local_addr(self: &Arc<Self>, addr: &ServiceAddr) -> std::io::Result<String> {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(port) = listeners.get(addr) {
            return Ok(format!("127.0.0.1:{port}"));
        }
        let std_listener = if self.prefer_service_ports {
            std::net::TcpListener::bind(("127.0.0.1", addr.port))
                .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))?
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")?
        };
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let listener = TcpListener::from_std(std_listener)?;
        listeners.insert(addr.clone(), port);
        tracing::info!(service = %addr.name, namespace = %addr.namespace, service_port = addr.port, local_port = port, "service proxy listening");
        tokio::spawn(Arc::clone(self).accept(listener, addr.clone()));
        Ok(format!("127.0.0.1:{port}"))
    }

    /// Starts a proxy for every port of every watched Service (so the gateway and the hub,
    /// which nothing inside the stack calls, are reachable too).
    pub fn ensure_all(self: &Arc<Self>) {
        for service in self.services.state() {
            let (Some(name), Some(namespace)) =
                (&service.metadata.name, &service.metadata.namespace)
            else {
                continue;
            };
            for port in service.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
                let Ok(port) = u16::try_from(port.port) else {
                    continue;
                };
                let addr = ServiceAddr {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    port,
                };
                if let Err(error) = self.local_addr(&addr) {
                    tracing::warn!(service = %name, %error, "cannot start a service proxy");
                }
            }
        }
    }

    /// Registers the process of pod `uid` on `port`.
    pub fn set_backend(&self, uid: &str, port: u16) {
        self.backends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid.to_owned(), port);
    }

    /// Forgets the process of pod `uid`.
    pub fn remove_backend(&self, uid: &str) {
        self.backends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uid);
    }

    /// `{"<namespace>/<service>:<port>": "127.0.0.1:<local>"}`.
    pub fn snapshot(&self) -> serde_json::Value {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        listeners
            .iter()
            .map(|(a, port)| {
                (
                    format!("{}/{}:{}", a.namespace, a.name, a.port),
                    serde_json::Value::String(format!("127.0.0.1:{port}")),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, addr: ServiceAddr) {
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((inbound, _)) = accepted else { continue };
            let Some(port) = self.pick(&addr) else {
                tracing::debug!(service = %addr.name, "no running endpoint; connection refused");
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await {
                    let mut inbound = inbound;
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }

    /// A running process of a pod the Service selects, round robin.
    fn pick(&self, addr: &ServiceAddr) -> Option<u16> {
        let service = self
            .services
            .get(&ObjectRef::new(&addr.name).within(&addr.namespace))?;
        let selector = service.spec.as_ref()?.selector.clone()?;
        let backends = self.backends.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ports: Vec<u16> = self
            .pods
            .state()
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(addr.namespace.as_str()))
            .filter(|p| {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .filter_map(|p| {
                p.metadata
                    .uid
                    .as_ref()
                    .and_then(|uid| backends.get(uid).copied())
            })
            .collect();
        ports.sort_unstable();
        if ports.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % ports.len();
        ports.get(i).copied()
    }
}
