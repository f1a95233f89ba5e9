//! A pod's container environment, resolved the way the kubelet does (pure: the Secrets and
//! ConfigMaps it refers to are passed in), and the rewrite of in-cluster Service addresses to
//! the runner's local Service proxies.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Container, Pod};

/// A Secret's or ConfigMap's data, decoded to text.
pub type Data = BTreeMap<String, String>;

/// What the environment refers to, fetched beforehand: `(namespace, name)` → data.
#[derive(Default, Debug)]
pub struct Refs {
    /// Secrets by `(namespace, name)`.
    pub secrets: HashMap<(String, String), Data>,
    /// ConfigMaps by `(namespace, name)`.
    pub config_maps: HashMap<(String, String), Data>,
}

/// The Secrets and ConfigMaps a container refers to: `(is_secret, name)`.
pub fn referenced(container: &Container) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for source in container.env_from.iter().flatten() {
        if let Some(cm) = &source.config_map_ref {
            out.push((false, cm.name.clone()));
        }
        if let Some(secret) = &source.secret_ref {
            out.push((true, secret.name.clone()));
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(from) = &var.value_from {
            if let Some(s) = &from.secret_key_ref {
                out.push((true, s.name.clone()));
            }
            if let Some(c) = &from.config_map_key_ref {
                out.push((false, c.name.clone()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Why an environment could not be resolved (the kubelet would not start the container).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    /// A required Secret or ConfigMap (or key) does not exist.
    #[error("{kind} {name} (key {key:?}) referenced by variable {var} does not exist")]
    Missing {
        /// `Secret` or `ConfigMap`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The key, when one was asked for.
        key: Option<String>,
        /// The variable that refers to it.
        var: String,
    },
}

/// The container's environment in kubelet order: `envFrom` sources first, then `env` (which
/// wins), optional references skipped when absent, `fieldRef`s from the pod.
pub fn resolve(
    pod: &Pod,
    container: &Container,
    refs: &Refs,
) -> Result<Vec<(String, String)>, EnvError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |name: String, value: String| match env.iter_mut().find(|(n, _)| *n == name) {
        Some(existing) => existing.1 = value,
        None => env.push((name, value)),
    };
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(cm) = &source.config_map_ref {
            (
                "ConfigMap",
                cm.name.clone(),
                cm.optional,
                refs.config_maps.get(&(ns.clone(), cm.name.clone())),
            )
        } else if let Some(s) = &source.secret_ref {
            (
                "Secret",
                s.name.clone(),
                s.optional,
                refs.secrets.get(&(ns.clone(), s.name.clone())),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => data
                .iter()
                .for_each(|(k, v)| set(format!("{prefix}{k}"), v.clone())),
            None if optional == Some(true) => {}
            None => {
                return Err(EnvError::Missing {
                    kind,
                    name,
                    key: None,
                    var: "envFrom".to_owned(),
                });
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => var.value.clone().unwrap_or_default(),
            Some(from) => {
                let looked_up = if let Some(s) = &from.secret_key_ref {
                    Some((
                        "Secret",
                        s.name.clone(),
                        s.key.clone(),
                        s.optional,
                        refs.secrets.get(&(ns.clone(), s.name.clone())),
                    ))
                } else if let Some(c) = &from.config_map_key_ref {
                    Some((
                        "ConfigMap",
                        c.name.clone(),
                        c.key.clone(),
                        c.optional,
                        refs.config_maps.get(&(ns.clone(), c.name.clone())),
                    ))
                } else {
                    None
                };
                if let Some((kind, name, key, optional, data)) = looked_up {
                    match data.and_then(|d| d.get(&key)) {
                        Some(v) => v.clone(),
                        None if optional == Some(true) => continue,
                        None => {
                            return Err(EnvError::Missing {
                                kind,
                                name,
                                key: Some(key),
                                var: var.name.clone(),
                            });
                        }
                    }
                } else if let Some(field) = &from.field_ref {
                    field_value(pod, &field.field_path)
                } else {
                    // resourceFieldRef: the runner imposes no limits; leave it unset.
                    continue;
                }
            }
        };
        set(var.name.clone(), value);
    }
    Ok(env)
}

fn field_value(pod: &Pod, path: &str) -> String {
    match path {
        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        // Processes run on the local host: their address is the loopback one.
        "status.podIP" | "status.hostIP" => "127.0.0.1".to_owned(),
        _ => String::new(),
    }
}

/// An in-cluster Service address found in a value: `name.namespace.svc[.cluster.local]:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAddr {
    /// The Service's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The Service port.
    pub port: u16,
}

/// Every Service address in `value`.
#[cfg(test)]
pub fn service_addrs(value: &str) -> Vec<ServiceAddr> {
    tokens(value)
        .filter_map(|(_, token)| parse_service_addr(token))
        .collect()
}

/// `value` with every Service address replaced by `local(addr)` (`host:port`).
pub fn rewrite(value: &str, mut local: impl FnMut(&ServiceAddr) -> Option<String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut last = 0;
    for (start, token) in tokens(value) {
        if let Some(replacement) = parse_service_addr(token).and_then(|addr| local(&addr)) {
            out.push_str(&value[last..start]);
            out.push_str(&replacement);
            last = start + token.len();
        }
    }
    out.push_str(&value[last..]);
    out
}

/// Maximal runs of host-and-port characters, with their byte offsets.
fn tokens(value: &str) -> impl Iterator<Item = (usize, &str)> {
    let is_part = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':');
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in value.char_indices() {
        match (is_part(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s, &value[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &value[s..]));
    }
    out.into_iter()
}

fn parse_service_addr(token: &str) -> Option<ServiceAddr> {
    let (host, port) = token.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.strip_suffix(".cluster.local").unwrap_or(host);
    let rest = host.strip_suffix(".svc")?;
    let (name, namespace) = rest.split_once('.')?;
    if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
        return None;
    }
    Some(ServiceAddr {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector,
        SecretKeySelector,
    };

    fn pod() -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("demo-api-gateway-abc".into());
        pod.metadata.namespace = Some("team".into());
        pod
    }

    fn data(pairs: &[(&str, &str)]) -> Data {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn env_wins_over_env_from_and_references_resolve() {
        let container = Container {
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cfg".into(),
                    optional: None,
                }),
                ..Default::default()
            }]),
            env: Some(vec![
                EnvVar {
                    name: "PORT".into(),
                    value: Some("9999".into()),
                    ..Default::default()
                },
                EnvVar {
                    name: "DATABASE_URL".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "db".into(),
                            key: "url".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "POD".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.name".into(),
                            api_version: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let mut refs = Refs::default();
        refs.config_maps.insert(
            ("team".into(), "cfg".into()),
            data(&[("PORT", "8080"), ("LOG_FORMAT", "json")]),
        );
        refs.secrets.insert(
            ("team".into(), "db".into()),
            data(&[("url", "postgres://u:p@h/d")]),
        );
        let env = resolve(&pod(), &container, &refs).unwrap();
        assert_eq!(
            env,
            vec![
                ("LOG_FORMAT".to_owned(), "json".to_owned()),
                ("PORT".to_owned(), "9999".to_owned()),
                ("DATABASE_URL".to_owned(), "postgres://u:p@h/d".to_owned()),
                ("POD".to_owned(), "demo-api-gateway-abc".to_owned()),
            ]
        );
        assert_eq!(
            referenced(&container),
            vec![(false, "cfg".to_owned()), (true, "db".to_owned())]
        );
    }

    #[test]
    fn a_missing_required_secret_key_is_an_error_naming_it() {
        let container = Container {
            env: Some(vec![EnvVar {
                name: "REDIS_URL".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "redis".into(),
                        key: "url".into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let err = resolve(&pod(), &container, &Refs::default()).unwrap_err();
        assert!(err.to_string().contains("Secret redis"), "{err}");
    }

    #[test]
    fn service_addresses_are_found_and_rewritten_in_place() {
        let value = "http://demo-command-service.team.svc:8082/v1,other.example.com:80,x.y.svc.cluster.local:9";
        assert_eq!(
            service_addrs(value),
            vec![
                ServiceAddr {
                    name: "demo-command-service".into(),
                    namespace: "team".into(),
                    port: 8082
                },
                ServiceAddr {
                    name: "x".into(),
                    namespace: "y".into(),
                    port: 9
                },
            ]
        );
        let rewritten = rewrite(value, |a| Some(format!("127.0.0.1:{}", a.port + 1)));
        assert_eq!(
            rewritten,
            "http://127.0.0.1:8083/v1,other.example.com:80,127.0.0.1:10"
        );
        assert_eq!(rewrite("no addresses here", |_| None), "no addresses here");
    }
}
