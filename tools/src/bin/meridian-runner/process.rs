//! Starts, watches and stops one service process per scheduled pod.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::{Api, Client};
use tokio::process::{Child, Command};

use crate::env::{self, Refs};
use crate::proxy::Proxies;

/// How long a process gets between SIGTERM and SIGKILL (the chart's and the operator's grace).
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Restart back-off after a crash, doubled up to `MAX_BACKOFF` (the kubelet's CrashLoopBackOff).
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Running {
    namespace: String,
    pod: String,
    binary: String,
    port: u16,
    /// The port of `/ready` and `/metrics`, when the pod has one (`OPS_PORT`).
    ops_port: Option<u16>,
    log: PathBuf,
    /// The resolved environment (secrets included: never logged).
    env: Vec<(String, String)>,
    child: Option<Child>,
    restarts: u32,
    backoff: Duration,
    retry_at: Option<Instant>,
}

/// The processes, keyed by pod uid.
pub struct Supervisor {
    client: Client,
    bin_dir: PathBuf,
    state_dir: PathBuf,
    proxies: Arc<Proxies>,
    running: HashMap<String, Running>,
    /// Pods that could not be started yet (missing Secret, missing binary), with the reason
    /// last logged, so a waiting pod is not logged every tick.
    waiting: HashMap<String, String>,
}

impl Supervisor {
    /// No processes yet.
    pub fn new(
        client: Client,
        bin_dir: PathBuf,
        state_dir: PathBuf,
        proxies: Arc<Proxies>,
    ) -> Self {
        Self {
            client,
            bin_dir,
            state_dir,
            proxies,
            running: HashMap::new(),
            waiting: HashMap::new(),
        }
    }

    /// Makes the processes match the scheduled pods.
    pub async fn sync(&mut self, pods: &[Arc<Pod>]) {
        let desired: HashMap<String, &Arc<Pod>> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .filter_map(|p| p.metadata.uid.clone().map(|uid| (uid, p)))
            .collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|uid| !desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(running) = self.running.remove(&uid) {
                self.proxies.remove_backend(&uid);
                stop(running).await;
            }
        }
        self.waiting.retain(|uid, _| desired.contains_key(uid));
        for (uid, pod) in desired {
            if self.running.contains_key(&uid) {
                self.watch(&uid).await;
                continue;
            }
            match self.prepare(pod).await {
                Ok(mut running) => {
                    self.waiting.remove(&uid);
                    running.child = spawn(&running, &self.bin_dir);
                    self.proxies.set_backend(&uid, running.port);
                    self.running.insert(uid, running);
                }
                Err(reason) => {
                    if self.waiting.get(&uid) != Some(&reason) {
                        tracing::warn!(pod = ?pod.metadata.name, %reason, "pod not started yet");
                        self.waiting.insert(uid, reason);
                    }
                }
            }
        }
    }

    /// Restarts a crashed process after its back-off.
    async fn watch(&mut self, uid: &str) {
        let Some(running) = self.running.get_mut(uid) else {
            return;
        };
        if let Some(child) = running.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            tracing::warn!(pod = %running.pod, binary = %running.binary, %status, log = %running.log.display(), "process exited; restarting after back-off");
            running.child = None;
            running.retry_at = Some(Instant::now() + running.backoff);
            running.backoff = (running.backoff * 2).min(MAX_BACKOFF);
        }
        if running.child.is_none() && running.retry_at.is_some_and(|t| t <= Instant::now()) {
            running.restarts += 1;
            running.retry_at = None;
            running.child = spawn(running, &self.bin_dir);
        }
    }

    /// Resolves the pod's binary and environment (fetching what it refers to).
    async fn prepare(&self, pod: &Pod) -> Result<Running, String> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .ok_or("the pod has no container")?;
        let binary = binary_of(container.image.as_deref().unwrap_or_default())
            .ok_or_else(|| format!("cannot tell the binary from image {:?}", container.image))?;
        if !self.bin_dir.join(&binary).exists() {
            return Err(format!(
                "binary {} not found in {}",
                binary,
                self.bin_dir.display()
            ));
        }
        let mut refs = Refs::default();
        for (is_secret, ref_name) in env::referenced(container) {
            let key = (namespace.clone(), ref_name.clone());
            if is_secret {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
                if let Ok(Some(secret)) = api.get_opt(&ref_name).await {
                    let data = secret
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                        .collect();
                    refs.secrets.insert(key, data);
                }
            } else {
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &namespace);
                if let Ok(Some(cm)) = api.get_opt(&ref_name).await {
                    refs.config_maps.insert(key, cm.data.unwrap_or_default());
                }
            }
        }
        let resolved = env::resolve(pod, container, &refs).map_err(|e| e.to_string())?;
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let mut env_vars = Vec::with_capacity(resolved.len() + 2);
        for (k, v) in resolved {
            let mut failed = None;
            let value = env::rewrite(&v, |addr| match self.proxies.local_addr(addr) {
                Ok(local) => Some(local),
                Err(e) => {
                    failed = Some(e.to_string());
                    None
                }
            });
            if let Some(e) = failed {
                return Err(format!("cannot start a service proxy: {e}"));
            }
            env_vars.push((k, value));
        }
        // Every pod of the host gets its own ports (in a cluster each has its own address).
        let ops_port = if env_vars.iter().any(|(k, _)| k == "OPS_PORT") {
            Some(free_port().map_err(|e| format!("no free port: {e}"))?)
        } else {
            None
        };
        env_vars.retain(|(k, _)| k != "PORT" && k != "OPS_PORT" && k != "BIND_ADDRESS");
        env_vars.push(("PORT".to_owned(), port.to_string()));
        if let Some(ops_port) = ops_port {
            env_vars.push(("OPS_PORT".to_owned(), ops_port.to_string()));
        }
        env_vars.push(("BIND_ADDRESS".to_owned(), "127.0.0.1".to_owned()));
        let log = self
            .state_dir
            .join("logs")
            .join(format!("{namespace}.{name}.log"));
        tracing::info!(pod = %name, %namespace, %binary, port, log = %log.display(), "starting");
        Ok(Running {
            namespace,
            pod: name,
            binary,
            port,
            ops_port,
            log,
            env: env_vars,
            child: None,
            restarts: 0,
            backoff: MIN_BACKOFF,
            retry_at: None,
        })
    }

    /// `[{namespace, pod, binary, port, ops_port, pid, restarts, log}]`.
    pub fn snapshot(&self) -> serde_json::Value {
        let mut pods: Vec<_> = self
            .running
            .values()
            .map(|r| {
                serde_json::json!({
                    "namespace": r.namespace, "pod": r.pod, "binary": r.binary, "port": r.port,
                    "ops_port": r.ops_port,
                    "pid": r.child.as_ref().and_then(Child::id), "restarts": r.restarts,
                    "log": r.log.display().to_string(),
                })
            })
            .collect();
        pods.sort_by_key(|p| format!("{}/{}", p["namespace"], p["pod"]));
        serde_json::Value::Array(pods)
    }

    /// Stops every process (on the runner's own shutdown).
    pub async fn stop_all(&mut self) {
        let all: Vec<_> = self.running.drain().map(|(_, r)| r).collect();
        futures::future::join_all(all.into_iter().map(stop)).await;
    }
}

fn spawn(running: &Running, bin_dir: &std::path::Path) -> Option<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&running.log)
        .ok()?;
    let stderr = log.try_clone().ok()?;
    match Command::new(bin_dir.join(&running.binary))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(running.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => Some(child),
        Err(error) => {
            tracing::warn!(binary = %running.binary, %error, "cannot start");
            None
        }
    }
}

/// SIGTERM (as the kubelet sends), then SIGKILL after the grace period.
async fn stop(mut running: Running) {
    let Some(mut child) = running.child.take() else {
        return;
    };
    tracing::info!(pod = %running.pod, binary = %running.binary, "stopping");
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// `registry/path/api-gateway:tag` (or `@sha256:…`) → `api-gateway`.
fn binary_of(image: &str) -> Option<String> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    let name = last.split(':').next()?;
    (!name.is_empty()).then(|| name.to_owned())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::binary_of;

    #[test]
    fn the_binary_is_the_image_name_without_registry_tag_or_digest() {
        assert_eq!(
            binary_of("registry.invalid/meridian/api-gateway:0.1.0").as_deref(),
            Some("api-gateway")
        );
        assert_eq!(
            binary_of("localhost:5000/ws-hub@sha256:abc").as_deref(),
            Some("ws-hub")
        );
        assert_eq!(binary_of("processor").as_deref(), Some("processor"));
        assert_eq!(binary_of(""), None);
    }
}
