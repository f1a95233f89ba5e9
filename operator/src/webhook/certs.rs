//! The webhook's self-managed certificates (pure): a CA and a serving certificate it signs,
//! kept in one Secret, and when to renew them.
//!
//! The CA lives [`Lifetimes::ca`] (5 years by default) and the serving certificate
//! [`Lifetimes::leaf`] (90 days); each is renewed once less than a third of its life is left,
//! or when the names the API server calls change. A renewed CA is trusted next to the previous
//! one (the CRD's `caBundle` holds both) until the previous one expires, so a replica still
//! presenting a certificate of the old CA keeps working while the new one spreads.
use std::collections::BTreeMap;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The Secret's keys: the serving certificate and key (the `kubernetes.io/tls` layout), the
/// CA bundle the API server trusts, and the CA's key.
pub const TLS_CRT: &str = "tls.crt";
/// The serving certificate's private key.
pub const TLS_KEY: &str = "tls.key";
/// The CA bundle: the current CA first, then the previous one while it is valid.
pub const CA_CRT: &str = "ca.crt";
/// The current CA's private key.
pub const CA_KEY: &str = "ca.key";
/// Annotations recording each certificate's expiry and the serving certificate's names.
pub const CA_NOT_AFTER: &str = "meridian.dev/ca-not-after";
/// See [`CA_NOT_AFTER`].
pub const CERT_NOT_AFTER: &str = "meridian.dev/cert-not-after";
/// See [`CA_NOT_AFTER`].
pub const CERT_NAMES: &str = "meridian.dev/cert-names";

/// How long the certificates the operator issues live.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// The CA's lifetime.
    pub ca: SignedDuration,
    /// The serving certificate's lifetime.
    pub leaf: SignedDuration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            ca: SignedDuration::from_hours(5 * 365 * 24),
            leaf: SignedDuration::from_hours(90 * 24),
        }
    }
}

/// Why a certificate could not be issued or used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or a key.
    #[error("failed to issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// A timestamp was out of range.
    #[error("certificate validity out of range: {0}")]
    Time(String),
}

/// The certificates in the Secret (or to be written to it).
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The CA bundle (PEM): the current CA, then the previous one while it is valid.
    pub ca_crt: String,
    /// The current CA's key (PEM).
    pub ca_key: String,
    /// The serving certificate (PEM).
    pub tls_crt: String,
    /// The serving certificate's key (PEM).
    pub tls_key: String,
    /// When the current CA expires.
    pub ca_not_after: Timestamp,
    /// When the serving certificate expires.
    pub cert_not_after: Timestamp,
    /// The DNS names and IP addresses the serving certificate is for.
    pub names: Vec<String>,
}

impl std::fmt::Debug for Bundle {
    // The keys are secrets: never in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("ca_not_after", &self.ca_not_after)
            .field("cert_not_after", &self.cert_not_after)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// What the certificates in the Secret need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: both are valid for more than a third of their life, for the right names.
    Keep,
    /// A new serving certificate from the same CA.
    RenewLeaf,
    /// A new CA (trusted next to the previous one) and a serving certificate from it.
    RenewCa,
    /// Nothing usable is stored: a new CA and serving certificate.
    Issue,
}

/// What the stored certificates (if any) need at `now` to serve `names`.
pub fn plan(stored: Option<&Bundle>, names: &[String], now: Timestamp, life: Lifetimes) -> Plan {
    let Some(stored) = stored else {
        return Plan::Issue;
    };
    let due = |not_after: Timestamp, lifetime: SignedDuration| {
        now.checked_add(lifetime / 3)
            .map_or(true, |t| t >= not_after)
    };
    if due(stored.ca_not_after, life.ca) {
        Plan::RenewCa
    } else if due(stored.cert_not_after, life.leaf) || stored.names != names {
        Plan::RenewLeaf
    } else {
        Plan::Keep
    }
}

/// Carries `plan` out: the bundle to store (the same one for [`Plan::Keep`]).
///
/// # Errors
/// When a key cannot be generated or parsed, or a certificate cannot be signed.
pub fn execute(
    plan: Plan,
    stored: Option<&Bundle>,
    names: &[String],
    now: Timestamp,
    life: Lifetimes,
) -> Result<Bundle, CertError> {
    let (ca_crt, ca_key, ca_not_after) = match (plan, stored) {
        (Plan::Keep, Some(stored)) => return Ok(stored.clone()),
        (Plan::RenewLeaf, Some(stored)) => (
            stored.ca_crt.clone(),
            stored.ca_key.clone(),
            stored.ca_not_after,
        ),
        (_, stored) => {
            let not_after = add(now, life.ca)?;
            let key = KeyPair::generate()?;
            let cert = ca_params(now, not_after)?.self_signed(&key)?;
            let mut bundle = cert.pem();
            // The previous CA stays trusted while certificates it signed may still be served.
            if let Some(current) = stored
                .filter(|s| s.ca_not_after > now)
                .and_then(|previous| first_pem(&previous.ca_crt))
            {
                bundle.push_str(current);
            }
            (bundle, key.serialize_pem(), not_after)
        }
    };
    let ca_key_pair = KeyPair::from_pem(&ca_key)?;
    let issuer = Issuer::new(ca_params(now, ca_not_after)?, ca_key_pair);
    let cert_not_after = add(now, life.leaf)?.min(ca_not_after);
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, "meridian-operator-webhook");
    leaf.not_before = offset(now.checked_sub(SignedDuration::from_mins(5)).unwrap_or(now))?;
    leaf.not_after = offset(cert_not_after)?;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate()?;
    let tls_crt = leaf.signed_by(&leaf_key, &issuer)?.pem();
    Ok(Bundle {
        ca_crt,
        ca_key,
        tls_crt,
        tls_key: leaf_key.serialize_pem(),
        ca_not_after,
        cert_not_after,
        names: names.to_vec(),
    })
}

/// The CA's parameters: the same name and usages every time, so its key alone identifies it
/// as the issuer of the serving certificates it signs.
fn ca_params(now: Timestamp, not_after: Timestamp) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "meridian-operator-webhook-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(now.checked_sub(SignedDuration::from_mins(5)).unwrap_or(now))?;
    params.not_after = offset(not_after)?;
    Ok(params)
}

/// The first PEM block of `pem`.
fn first_pem(pem: &str) -> Option<&str> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.find(END).map(|end| {
        let end = end + END.len();
        let end = pem[end..].find('\n').map_or(end, |n| end + n + 1);
        &pem[..end]
    })
}

fn add(now: Timestamp, lifetime: SignedDuration) -> Result<Timestamp, CertError> {
    now.checked_add(lifetime)
        .map_err(|e| CertError::Time(e.to_string()))
}

fn offset(t: Timestamp) -> Result<time::OffsetDateTime, CertError> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .map_err(|e| CertError::Time(e.to_string()))
}

impl Bundle {
    /// The Secret's `data` and annotations.
    pub fn to_secret(&self) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let data = BTreeMap::from([
            (CA_CRT.to_owned(), self.ca_crt.clone()),
            (CA_KEY.to_owned(), self.ca_key.clone()),
            (TLS_CRT.to_owned(), self.tls_crt.clone()),
            (TLS_KEY.to_owned(), self.tls_key.clone()),
        ]);
        let annotations = BTreeMap::from([
            (CA_NOT_AFTER.to_owned(), self.ca_not_after.to_string()),
            (CERT_NOT_AFTER.to_owned(), self.cert_not_after.to_string()),
            (CERT_NAMES.to_owned(), self.names.join(",")),
        ]);
        (data, annotations)
    }

    /// The bundle a Secret holds; `None` when any part is missing or unreadable (it is then
    /// issued anew).
    pub fn from_secret(
        data: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> Option<Self> {
        let text = |key: &str| data.get(key).filter(|v| !v.is_empty()).cloned();
        let time = |key: &str| annotations.get(key).and_then(|v| v.parse().ok());
        Some(Self {
            ca_crt: text(CA_CRT)?,
            ca_key: text(CA_KEY)?,
            tls_crt: text(TLS_CRT)?,
            tls_key: text(TLS_KEY)?,
            ca_not_after: time(CA_NOT_AFTER)?,
            cert_not_after: time(CERT_NOT_AFTER)?,
            names: annotations
                .get(CERT_NAMES)?
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests;
