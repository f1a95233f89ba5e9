//! The CRD conversion webhook: the API server calls it to convert `MiddlewareStack` objects
//! between `v1alpha1` and `v1beta1` ([`convert`], pure), over HTTPS.
//!
//! Every operator replica serves it (not only the leader): the API server needs it for any
//! request that touches a version other than the stored one. Its certificate comes either
//!
//! - from the operator itself ([`Certificates::SelfManaged`], the chart's default): a CA and a
//!   serving certificate kept in a Secret, renewed ahead of expiry ([`certs`]), with the CA
//!   written into the CRD's `caBundle` (and where the API server calls, a Service or a URL);
//! - or from files ([`Certificates::Directory`]): cert-manager's Secret mounted into the pod,
//!   re-read as it rotates, with the `caBundle` injected by cert-manager's CA injector.
//!
//! Each replica re-reads the Secret or the files every [`WebhookSettings::refresh`] and swaps
//! the certificate it presents without dropping connections.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::{Json, Router};
use common::http::ServerLimits;
use common::metrics::{OPERATOR_CONVERSIONS_TOTAL, OPERATOR_WEBHOOK_CERT_EXPIRY};
use common::shutdown::CancellationToken;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceConversion, CustomResourceDefinition, ServiceReference, WebhookClientConfig,
    WebhookConversion,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::conversion::ConversionReview;
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

pub mod certs;
pub mod convert;

use crate::crd::VERSION;

/// The path the API server posts `ConversionReview`s to.
pub const PATH: &str = "/convert";
/// The port the webhook listens on (`WEBHOOK_PORT`).
pub const DEFAULT_PORT: u16 = 9443;
/// The Service the chart creates for the webhook.
pub const DEFAULT_SERVICE: &str = "meridian-operator-webhook";
/// The chart's usual namespace.
pub const DEFAULT_NAMESPACE: &str = "meridian-system";
/// The Secret the self-managed certificates live in.
pub const DEFAULT_SECRET: &str = "meridian-operator-webhook-tls";
/// The CRD the webhook converts.
pub const CRD_NAME: &str = "middlewarestacks.meridian.dev";
/// The largest `ConversionReview` accepted: the API server converts a whole list in one.
const MAX_REVIEW_BYTES: usize = 64 * 1024 * 1024;

/// How the API server reaches the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientConfig {
    /// Through a Service (an operator in the cluster), on port 443.
    Service {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
    },
    /// At a URL (an operator outside the cluster, as in development).
    Url(String),
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self::Service {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            name: DEFAULT_SERVICE.to_owned(),
        }
    }
}

impl ClientConfig {
    /// The CRD's `clientConfig`, trusting `ca_bundle` (PEM).
    pub fn to_crd(&self, ca_bundle: Option<&str>) -> WebhookClientConfig {
        let ca_bundle = ca_bundle.map(|pem| ByteString(pem.as_bytes().to_vec()));
        match self {
            Self::Service { namespace, name } => WebhookClientConfig {
                ca_bundle,
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(PATH.to_owned()),
                    port: Some(443),
                }),
                url: None,
            },
            Self::Url(url) => WebhookClientConfig {
                ca_bundle,
                service: None,
                url: Some(url.clone()),
            },
        }
    }

    /// The names the serving certificate must carry: the Service's DNS names, or the URL's
    /// host (a name or an IP address).
    pub fn names(&self) -> Vec<String> {
        match self {
            Self::Service { namespace, name } => vec![
                name.clone(),
                format!("{name}.{namespace}"),
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.cluster.local"),
            ],
            Self::Url(url) => url::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()))
                .into_iter()
                .collect(),
        }
    }
}

/// The CRD's `spec.conversion`: by webhook, at `client`.
pub fn conversion(client: ClientConfig) -> CustomResourceConversion {
    CustomResourceConversion {
        strategy: "Webhook".to_owned(),
        webhook: Some(WebhookConversion {
            client_config: Some(client.to_crd(None)),
            conversion_review_versions: vec!["v1".to_owned()],
        }),
    }
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum Certificates {
    /// Issued and renewed by the operator, kept in a Secret; the operator writes the CRD's
    /// `clientConfig` and `caBundle`.
    SelfManaged {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        secret: String,
        /// How long the certificates live.
        lifetimes: certs::Lifetimes,
    },
    /// `tls.crt` and `tls.key` in a directory (cert-manager's Secret, mounted); the CRD's
    /// `caBundle` is cert-manager's CA injector's to write.
    Directory(PathBuf),
}

/// The webhook's settings.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// How the API server calls it.
    pub client: ClientConfig,
    /// Where its certificate comes from.
    pub certificates: Certificates,
    /// How often the certificate is checked (renewed, re-read).
    pub refresh: Duration,
}

/// Why the webhook could not get its certificate ready.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A Kubernetes request failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A certificate could not be issued.
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    /// The certificate or key could not be read.
    #[error("unusable certificate or key: {0}")]
    Tls(String),
    /// The certificate files could not be read.
    #[error("failed to read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The certificate every handshake presents; swapped on rotation.
#[derive(Debug, Default)]
pub struct Resolver(RwLock<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().and_then(|current| current.clone())
    }
}

/// Readiness: the webhook presents a certificate (a replica that has none yet would fail
/// every conversion the Service sends it).
pub struct Serving(Arc<Resolver>);

impl common::health::Check for Serving {
    fn name(&self) -> &'static str {
        "conversion-webhook"
    }

    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        let ready = self.0.0.read().is_ok_and(|current| current.is_some());
        Box::pin(async move {
            if ready {
                Ok(())
            } else {
                Err("no certificate loaded yet (see the operator's log)".to_owned())
            }
        })
    }
}

impl Resolver {
    fn set(&self, key: CertifiedKey) {
        if let Ok(mut current) = self.0.write() {
            *current = Some(Arc::new(key));
        }
    }
}

/// The webhook: its settings, the certificate it serves, and the Kubernetes client it keeps
/// that certificate with.
pub struct Webhook {
    client: Client,
    settings: WebhookSettings,
    resolver: Arc<Resolver>,
    /// The PEM of the certificate served, to notice a change.
    served: tokio::sync::Mutex<Option<String>>,
}

impl Webhook {
    /// A webhook that serves nothing until [`Webhook::refresh`] has loaded a certificate.
    pub fn new(client: Client, settings: WebhookSettings) -> Self {
        Self {
            client,
            settings,
            resolver: Arc::default(),
            served: tokio::sync::Mutex::new(None),
        }
    }

    /// The readiness check of this webhook.
    pub fn serving(&self) -> Serving {
        Serving(self.resolver.clone())
    }

    /// Makes sure a valid certificate is served: self-managed, renews the one in the Secret
    /// when due (or issues one) and makes the CRD trust its CA and call where it should;
    /// from a directory, loads the files if they changed.
    ///
    /// # Errors
    /// When the Secret, the CRD or the files cannot be read or written.
    pub async fn refresh(&self) -> Result<(), WebhookError> {
        let (tls_crt, tls_key, expiry) = match &self.settings.certificates {
            Certificates::SelfManaged {
                namespace,
                secret,
                lifetimes,
            } => {
                let bundle = self.stored_bundle(namespace, secret, *lifetimes).await?;
                self.trust(&bundle.ca_crt).await?;
                (bundle.tls_crt, bundle.tls_key, Some(bundle.cert_not_after))
            }
            Certificates::Directory(dir) => {
                let read = |name: &str| {
                    let path = dir.join(name);
                    std::fs::read_to_string(&path)
                        .map_err(|source| WebhookError::Io { path, source })
                };
                (read(certs::TLS_CRT)?, read(certs::TLS_KEY)?, None)
            }
        };
        let mut served = self.served.lock().await;
        if served.as_deref() != Some(tls_crt.as_str()) {
            self.resolver.set(certified_key(&tls_crt, &tls_key)?);
            tracing::info!(expires = ?expiry.map(|t| t.to_string()), "Serving a new webhook certificate.");
            *served = Some(tls_crt);
        }
        if let Some(expiry) = expiry {
            #[allow(clippy::cast_precision_loss, reason = "seconds since 1970 fit an f64")]
            metrics::gauge!(OPERATOR_WEBHOOK_CERT_EXPIRY).set(expiry.as_second() as f64);
        }
        Ok(())
    }

    /// The certificates in the Secret, renewed (and written back) when due.
    async fn stored_bundle(
        &self,
        namespace: &str,
        name: &str,
        lifetimes: certs::Lifetimes,
    ) -> Result<certs::Bundle, WebhookError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let names = self.settings.client.names();
        let existing = secrets.get_opt(name).await?;
        let stored = existing.as_ref().and_then(|secret| {
            let data: BTreeMap<String, String> = secret
                .data
                .iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
                .collect();
            certs::Bundle::from_secret(&data, secret.metadata.annotations.as_ref()?)
        });
        let now = Timestamp::now();
        let plan = certs::plan(stored.as_ref(), &names, now, lifetimes);
        if let (certs::Plan::Keep, Some(stored)) = (plan, &stored) {
            return Ok(stored.clone());
        }
        let bundle = certs::execute(plan, stored.as_ref(), &names, now, lifetimes)?;
        let (data, annotations) = bundle.to_secret();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                annotations: Some(annotations),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "meridian-operator".to_owned(),
                )])),
                resource_version: existing
                    .as_ref()
                    .and_then(|s| s.metadata.resource_version.clone()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            string_data: Some(data),
            ..Secret::default()
        };
        // Replicas race to renew: the resourceVersion (or the name, on create) lets one win;
        // the others fail here and take the winner's certificates on their next refresh.
        match existing {
            Some(_) => {
                secrets
                    .replace(name, &PostParams::default(), &secret)
                    .await?
            }
            None => secrets.create(&PostParams::default(), &secret).await?,
        };
        tracing::info!(?plan, secret = name, %namespace, names = ?bundle.names, "Renewed the webhook's certificates.");
        Ok(bundle)
    }

    /// Makes the CRD call this webhook where it should and trust `ca_bundle`; writes only
    /// when something differs.
    async fn trust(&self, ca_bundle: &str) -> Result<(), WebhookError> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let want = self.settings.client.to_crd(Some(ca_bundle));
        let current = crds.get(CRD_NAME).await?;
        let have = current
            .spec
            .conversion
            .as_ref()
            .and_then(|c| c.webhook.as_ref())
            .and_then(|w| w.client_config.as_ref());
        if have == Some(&want) {
            return Ok(());
        }
        // A merge patch, so that the chart (or whoever installed the CRD) keeps owning the
        // rest of it; `null` clears the other way of calling.
        let mut client_config = serde_json::to_value(&want).unwrap_or_default();
        for key in ["service", "url"] {
            client_config
                .as_object_mut()
                .map(|c| c.entry(key).or_insert(serde_json::Value::Null));
        }
        let patch = serde_json::json!({"spec": {"conversion": {
            "strategy": "Webhook",
            "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": client_config}
        }}});
        crds.patch(CRD_NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(crd = CRD_NAME, "The CRD now trusts the webhook's CA.");
        Ok(())
    }

    /// Keeps the certificate fresh and serves conversions on `listener` until `shutdown`.
    ///
    /// # Errors
    /// When the listener fails.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        limits: ServerLimits,
        shutdown: CancellationToken,
    ) -> Result<(), WebhookError> {
        let acceptor = acceptor(self.resolver.clone())?;
        let keeper = {
            let (webhook, shutdown) = (self.clone(), shutdown.clone());
            tokio::spawn(async move { webhook.keep_fresh(shutdown).await })
        };
        let served = common::http::serve_tls(
            listener,
            router(),
            acceptor,
            "meridian-operator-webhook",
            limits,
            Duration::from_secs(5),
            shutdown,
        )
        .await;
        keeper.abort();
        served.map_err(|source| WebhookError::Io {
            path: PathBuf::from("webhook listener"),
            source,
        })
    }

    /// Refreshes every [`WebhookSettings::refresh`]; after a failure, retries sooner.
    async fn keep_fresh(&self, shutdown: CancellationToken) {
        let mut retry = Duration::from_secs(1);
        loop {
            let wait = match self.refresh().await {
                Ok(()) => {
                    retry = Duration::from_secs(1);
                    self.settings.refresh
                }
                Err(error) => {
                    tracing::warn!(%error, retry_seconds = retry.as_secs(), "Failed to refresh the webhook's certificate.");
                    let wait = retry;
                    retry = (retry * 2).min(self.settings.refresh);
                    wait
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// What [`migrate_storage`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Migrated {
    /// Stacks rewritten at the storage version (or found rewritten by someone else meanwhile).
    pub rewritten: usize,
    /// Whether the CRD still listed another stored version (and now lists only [`VERSION`]).
    pub pruned: bool,
}

/// Rewrites every stack at the storage version, then records that nothing else is stored
/// (`status.storedVersions`), so that an older version can later stop being served. Needs
/// the conversion webhook serving (reading an object stored as `v1alpha1` converts it) and
/// the whole cluster in view; run by the leader of a cluster-wide operator at start.
///
/// # Errors
/// When the CRD or the stacks cannot be read or written; nothing is recorded then, and the
/// next attempt starts over (rewriting a stack already migrated changes nothing).
pub async fn migrate_storage(client: &Client) -> Result<Migrated, kube::Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let stored = crds
        .get_status(CRD_NAME)
        .await?
        .status
        .and_then(|s| s.stored_versions)
        .unwrap_or_default();
    if stored.iter().all(|v| v == VERSION) {
        return Ok(Migrated::default());
    }
    let resource = kube::api::ApiResource::erase::<crate::crd::MiddlewareStack>(&());
    let stacks: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let mut rewritten = 0;
    for stack in stacks.list(&ListParams::default()).await? {
        let (Some(namespace), name) = (stack.metadata.namespace.clone(), stack.name_any()) else {
            continue;
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
        // The object as read, written back: the API server stores it at the storage version.
        match api.replace(&name, &PostParams::default(), &stack).await {
            // Written since it was listed (so stored at the storage version) or gone.
            Ok(_) => rewritten += 1,
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                rewritten += 1;
            }
            Err(error) => return Err(error),
        }
    }
    let patch = serde_json::json!({"status": {"storedVersions": [VERSION]}});
    crds.patch_status(CRD_NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(rewritten, previously = ?stored, "Migrated every stack to the storage version {VERSION}.");
    Ok(Migrated {
        rewritten,
        pruned: true,
    })
}

/// A TLS acceptor presenting whatever certificate `resolver` holds at each handshake.
///
/// # Errors
/// Never in practice: the protocol versions are the provider's defaults.
fn acceptor(resolver: Arc<Resolver>) -> Result<TlsAcceptor, WebhookError> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The certificate chain and key a handshake presents.
fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, WebhookError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| WebhookError::Tls(format!("certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| WebhookError::Tls(format!("key: {e}")))?;
    let key = tokio_rustls::rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| WebhookError::Tls(format!("key: {e}")))?;
    Ok(CertifiedKey::new(chain, key))
}

/// `POST /convert`.
pub fn router() -> Router {
    Router::new()
        .route(PATH, post(convert_review))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
}

async fn convert_review(Json(review): Json<ConversionReview>) -> Json<ConversionReview> {
    let desired = review
        .request
        .as_ref()
        .map(|r| r.desired_api_version.as_str())
        .and_then(|v| v.strip_prefix("meridian.dev/"))
        .and_then(|v| convert::VERSIONS.iter().find(|known| **known == v))
        .copied()
        .unwrap_or("other");
    let objects = review.request.as_ref().map_or(0, |r| r.objects.len());
    let answer = convert::review(review);
    let result = answer.response.as_ref().map_or("Failure", |r| {
        if r.result.is_success() {
            "Success"
        } else {
            "Failure"
        }
    });
    if result == "Success" {
        tracing::debug!(%desired, objects, "Converted.");
    } else {
        let message = answer.response.as_ref().map(|r| r.result.message.clone());
        tracing::warn!(%desired, objects, ?message, "Refused a conversion.");
    }
    metrics::counter!(OPERATOR_CONVERSIONS_TOTAL, "desired" => desired, "result" => result)
        .increment(1);
    Json(answer)
}

#[cfg(test)]
mod tests;
