//! JWT authentication shared by the gateway and the WebSocket hub.
//!
//! Tokens are verified with the maintained [`jsonwebtoken`] crate (pure-Rust crypto backend);
//! nothing here parses or checks a signature by hand. Keys come from any combination of:
//! - `JWT_SECRET`: an HMAC secret (HS256/HS384/HS512);
//! - `JWT_PUBLIC_KEY`: a PEM public key, RSA (RS256…PS512) or EC (ES256/ES384);
//! - `JWT_JWKS_URL`: a JSON Web Key Set fetched over HTTP(S), cached, re-fetched when a token
//!   names an unknown `kid` (at most once per `JWT_JWKS_REFRESH_SECONDS`) and when the cache is
//!   older than `JWT_JWKS_MAX_AGE_SECONDS`.
//!
//! Each key only accepts the algorithms of its own family, so a token whose header says
//! `HS256` is never checked against an RSA public key used as an HMAC secret ("algorithm
//! confusion"). `exp` is required and `nbf` honoured, both with `JWT_LEEWAY_SECONDS` of clock
//! skew; `iss` and `aud` are required and checked when `JWT_ISSUER` / `JWT_AUDIENCE` are set.
//! A token carrying an `aud` is refused when no audience is configured (RFC 7519 §4.1.3).
//! With no key source configured, authentication is disabled: [`Verifier::is_enabled`] is
//! false and every request is anonymous.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

/// HMAC secrets shorter than this (the SHA-256 output size, RFC 7518 §3.2) are weak.
const MIN_SECRET_BYTES: usize = 32;

/// JWT settings, read from the same variables by every service that authenticates.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthConfig {
    /// `JWT_SECRET`: shared HMAC secret for HS256/HS384/HS512 tokens. Unset: no HMAC key.
    pub jwt_secret: Option<SecretString>,
    /// `JWT_PUBLIC_KEY`: PEM public key (`-----BEGIN PUBLIC KEY-----`, RSA or EC P-256/P-384)
    /// for RS*/PS*/ES* tokens. Unset: no static public key.
    pub jwt_public_key: Option<String>,
    /// `JWT_JWKS_URL`: URL of a JSON Web Key Set (for example an identity provider's
    /// `…/.well-known/jwks.json`). Unset: no JWKS.
    pub jwt_jwks_url: Option<Url>,
    /// `JWT_ISSUER`: accepted `iss` values, comma-separated. Set: `iss` is required.
    pub jwt_issuer: Option<String>,
    /// `JWT_AUDIENCE`: accepted `aud` values, comma-separated. Set: `aud` is required.
    pub jwt_audience: Option<String>,
    /// `JWT_LEEWAY_SECONDS`: clock skew tolerated on `exp` and `nbf`. Default 30.
    #[serde(default = "defaults::leeway_seconds")]
    pub jwt_leeway_seconds: u64,
    /// `JWT_JWKS_REFRESH_SECONDS`: minimum interval between two JWKS fetches triggered by an
    /// unknown `kid` or a failed fetch (protects the identity provider). Default 10.
    #[serde(default = "defaults::jwks_refresh_seconds")]
    pub jwt_jwks_refresh_seconds: u64,
    /// `JWT_JWKS_MAX_AGE_SECONDS`: the cached key set is re-fetched when older than this, so
    /// a key removed from the set stops being accepted. Default 300.
    #[serde(default = "defaults::jwks_max_age_seconds")]
    pub jwt_jwks_max_age_seconds: u64,
    /// `JWT_JWKS_TIMEOUT_MS`: connect + response timeout of one JWKS fetch. Default 5000.
    #[serde(default = "defaults::jwks_timeout_ms")]
    pub jwt_jwks_timeout_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_public_key: None,
            jwt_jwks_url: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_seconds: defaults::leeway_seconds(),
            jwt_jwks_refresh_seconds: defaults::jwks_refresh_seconds(),
            jwt_jwks_max_age_seconds: defaults::jwks_max_age_seconds(),
            jwt_jwks_timeout_ms: defaults::jwks_timeout_ms(),
        }
    }
}

mod defaults {
    pub fn leeway_seconds() -> u64 {
        30
    }
    pub fn jwks_refresh_seconds() -> u64 {
        10
    }
    pub fn jwks_max_age_seconds() -> u64 {
        300
    }
    pub fn jwks_timeout_ms() -> u64 {
        5000
    }
}

/// Why a token was refused (or the verifier could not be built). Every message is safe to
/// return to a client: none contains a key, a secret or the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// `exp` is in the past (beyond the leeway).
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// The signature does not match the key.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `iss` is missing or not one of `JWT_ISSUER`.
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    /// `aud` is missing or not one of `JWT_AUDIENCE`.
    #[error("the token's audience is not accepted")]
    WrongAudience,
    /// No configured key has the token's `kid` (even after refreshing the JWKS).
    #[error("the token's signing key is unknown")]
    UnknownKey,
    /// The header's `alg` is not one the selected key may be used with (including `none` and
    /// HMAC algorithms against public keys).
    #[error("the token's algorithm is not accepted")]
    AlgorithmNotAllowed,
    /// Not a JWT, or its claims are not what the platform needs (the text says which).
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// The JWKS could not be fetched and no earlier copy is cached.
    #[error("the token's signing keys are unavailable")]
    JwksUnavailable,
    /// No key source is configured, so no token can be verified.
    #[error("authentication is not configured")]
    Disabled,
    /// The configuration is unusable (at start-up only).
    #[error("invalid JWT configuration: {0}")]
    Config(String),
}

impl AuthError {
    /// A short, stable label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::UnknownKey => "unknown_key",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::Malformed(_) => "malformed",
            Self::JwksUnavailable => "jwks_unavailable",
            Self::Disabled => "disabled",
            Self::Config(_) => "config",
        }
    }

    /// Whether the failure is on the server's side (retrying later may succeed), as opposed
    /// to a token that is simply not acceptable.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::JwksUnavailable)
    }

    fn from_jwt(error: &jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind;
        match error.kind() {
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::InvalidIssuer => Self::WrongIssuer,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "iss" => Self::WrongIssuer,
                "aud" => Self::WrongAudience,
                other => Self::Malformed(format!("the `{other}` claim is required")),
            },
            ErrorKind::InvalidClaimFormat(claim) => {
                Self::Malformed(format!("the `{claim}` claim has the wrong type"))
            }
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::MissingAlgorithm => Self::AlgorithmNotAllowed,
            ErrorKind::Json(_) => Self::Malformed("the claims are not the expected JSON".into()),
            ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                Self::Malformed("not a JWS compact serialisation".into())
            }
            // Key/provider trouble while verifying: the token cannot be trusted.
            _ => Self::BadSignature,
        }
    }
}

/// The claims the platform uses from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: the authenticated subject (user or service account). Never empty.
    pub sub: String,
    /// `client_id` claim, else `azp` (the OAuth client the token was issued to).
    pub client_id: Option<String>,
    /// `rooms` claim: WebSocket room patterns (`chat:*`) the subject may join besides the
    /// rooms of the documents it may read (see [`crate::access`]).
    pub rooms: Vec<String>,
    /// `read` claim: document patterns (`orders/*`) the subject may read.
    pub read: Vec<String>,
    /// `write` claim: document patterns the subject may send commands for.
    pub write: Vec<String>,
    /// `exp`: expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// `iss`, when the token has a single-string issuer.
    pub iss: Option<String>,
}

/// What [`mint_hs256`] puts in a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `sub`.
    pub subject: String,
    /// `iss` (the stack's `auth.issuer`), if any.
    pub issuer: Option<String>,
    /// `aud` (the stack's `auth.audience`), if any.
    pub audience: Option<String>,
    /// `client_id`, if any (rate limits are per client when present).
    pub client_id: Option<String>,
    /// `rooms`: WebSocket room patterns the subject may join (besides its documents' rooms).
    pub rooms: Vec<String>,
    /// `read`: document patterns (`<collection>/<id>`, wildcards) the subject may read.
    pub read: Vec<String>,
    /// `write`: document patterns the subject may send commands for.
    pub write: Vec<String>,
    /// How long the token is valid (`exp` = now + ttl; `nbf` 5 s in the past for clock skew).
    pub ttl: Duration,
}

/// Signs a token for `grant` with the shared HMAC `secret` (HS256), as the stack's gateway
/// and hub verify it with `JWT_SECRET`. For tools that hand out tokens (`kubectl meridian
/// token`, the smoke client), never used by the services themselves.
pub fn mint_hs256(secret: &[u8], grant: &Grant) -> Result<String, jsonwebtoken::errors::Error> {
    let now = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(grant.ttl.as_secs()).unwrap_or(i64::MAX);
    let mut claims = serde_json::json!({
        "sub": grant.subject,
        "iat": now,
        "nbf": now - 5,
        "exp": now.saturating_add(ttl),
        "rooms": grant.rooms,
        "read": grant.read,
        "write": grant.write,
    });
    for (name, value) in [
        ("iss", &grant.issuer),
        ("aud", &grant.audience),
        ("client_id", &grant.client_id),
    ] {
        if let Some(value) = value {
            claims[name] = serde_json::Value::String(value.clone());
        }
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 6750
/// §2.1), if there is one.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[derive(Deserialize)]
struct RawClaims {
    // Optional here so that a missing claim is reported by the validation step by name.
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<serde_json::Number>,
    #[serde(default)]
    iss: Option<serde_json::Value>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    rooms: Vec<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
}

impl RawClaims {
    fn into_claims(self) -> Result<Claims, AuthError> {
        let sub = self
            .sub
            .filter(|sub| !sub.is_empty())
            .ok_or_else(|| AuthError::Malformed("the `sub` claim is empty".into()))?;
        let exp = self
            .exp
            .and_then(|exp| exp.as_i64().or_else(|| exp.as_f64().map(|exp| exp as i64)))
            .ok_or_else(|| AuthError::Malformed("the `exp` claim has the wrong type".into()))?;
        Ok(Claims {
            sub,
            client_id: self.client_id.or(self.azp).filter(|id| !id.is_empty()),
            rooms: self.rooms,
            read: self.read,
            write: self.write,
            exp,
            iss: match self.iss {
                Some(serde_json::Value::String(iss)) => Some(iss),
                _ => None,
            },
        })
    }
}

/// One usable key and the validation rules (algorithms of its family) that go with it.
struct KeyEntry {
    key: DecodingKey,
    validation: Validation,
}

impl KeyEntry {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.validation.algorithms.contains(&alg)
    }
}

/// Verifies tokens. Cheap to clone (one shared key set and JWKS cache).
#[derive(Clone)]
pub struct Verifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// Keys from `JWT_SECRET` and `JWT_PUBLIC_KEY`.
    fixed: Vec<KeyEntry>,
    jwks: Option<Jwks>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("Verifier(disabled)"),
            Some(inner) => f
                .debug_struct("Verifier")
                .field("fixed_keys", &inner.fixed.len())
                .field("jwks", &inner.jwks.as_ref().map(|jwks| jwks.url.as_str()))
                .finish(),
        }
    }
}

impl Verifier {
    /// Builds the key set from the configuration (parsing PEM keys now, so a bad key fails
    /// start-up). The JWKS, if any, is fetched on first use.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let template = validation_template(config);
        let mut fixed = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            let secret = secret.expose_secret().as_bytes();
            if secret.is_empty() {
                return Err(AuthError::Config("JWT_SECRET is empty".into()));
            }
            if secret.len() < MIN_SECRET_BYTES {
                tracing::warn!(
                    bytes = secret.len(),
                    "JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes; use a longer secret."
                );
            }
            fixed.push(KeyEntry {
                key: DecodingKey::from_secret(secret),
                validation: with_algorithms(&template, AlgorithmFamily::Hmac.algorithms()),
            });
        }
        if let Some(pem) = &config.jwt_public_key {
            fixed.push(public_key_entry(pem.as_bytes(), &template)?);
        }
        let jwks = match &config.jwt_jwks_url {
            Some(url) => Some(Jwks::new(url.clone(), config, template)?),
            None => None,
        };
        if fixed.is_empty() && jwks.is_none() {
            return Ok(Self::disabled());
        }
        Ok(Self {
            inner: Some(Arc::new(Inner { fixed, jwks })),
        })
    }

    /// A verifier with no keys: every token is refused with [`AuthError::Disabled`].
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Whether any key source is configured.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Verifies `token` (the compact JWS, without any `Bearer ` prefix) and returns its
    /// claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let inner = self.inner.as_ref().ok_or(AuthError::Disabled)?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::from_jwt(&e))?;
        let alg = header.alg;

        // A `kid` is looked up in the JWKS first; the fixed keys have no id, so they serve
        // tokens without one (or whose id the JWKS does not know).
        let mut jwks_keys = None;
        if let (Some(kid), Some(jwks)) = (header.kid.as_deref(), &inner.jwks) {
            let keys = jwks.keys(Some(kid)).await?;
            if let Some(entry) = keys.by_kid.get(kid) {
                return decode(token, entry, alg);
            }
            jwks_keys = Some(keys);
        }
        if let Some(entry) = inner.fixed.iter().find(|entry| entry.accepts(alg)) {
            return decode(token, entry, alg);
        }
        if let Some(jwks) = &inner.jwks
            && header.kid.is_none()
        {
            let keys = jwks.keys(None).await?;
            // Without a `kid`, a set with exactly one key for the algorithm is unambiguous.
            {
                let mut candidates = keys.all().filter(|entry| entry.accepts(alg));
                if let (Some(entry), None) = (candidates.next(), candidates.next()) {
                    return decode(token, entry, alg);
                }
            }
            jwks_keys = Some(keys);
        }
        let any_key_for_alg = inner.fixed.iter().any(|entry| entry.accepts(alg))
            || jwks_keys.is_some_and(|keys| keys.all().any(|entry| entry.accepts(alg)));
        if header.kid.is_some() || any_key_for_alg {
            Err(AuthError::UnknownKey)
        } else {
            Err(AuthError::AlgorithmNotAllowed)
        }
    }
}

fn decode(token: &str, entry: &KeyEntry, alg: Algorithm) -> Result<Claims, AuthError> {
    if !entry.accepts(alg) {
        return Err(AuthError::AlgorithmNotAllowed);
    }
    jsonwebtoken::decode::<RawClaims>(token, &entry.key, &entry.validation)
        .map_err(|e| AuthError::from_jwt(&e))?
        .claims
        .into_claims()
}

/// Validation rules without algorithms (each key adds those of its family).
fn validation_template(config: &AuthConfig) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms.clear();
    validation.leeway = config.jwt_leeway_seconds;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if let Some(issuers) = config.jwt_issuer.as_deref().map(comma_list) {
        validation.set_issuer(&issuers);
        required.push("iss");
    }
    if let Some(audiences) = config.jwt_audience.as_deref().map(comma_list) {
        validation.set_audience(&audiences);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

fn with_algorithms(template: &Validation, algorithms: &[Algorithm]) -> Validation {
    let mut validation = template.clone();
    validation.algorithms = algorithms.to_vec();
    validation
}

/// A PEM public key: RSA (any RS*/PS* algorithm) or EC (ES256/ES384).
fn public_key_entry(pem: &[u8], template: &Validation) -> Result<KeyEntry, AuthError> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(KeyEntry {
            key,
            validation: with_algorithms(template, AlgorithmFamily::Rsa.algorithms()),
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok(KeyEntry {
            key,
            validation: with_algorithms(template, AlgorithmFamily::Ec.algorithms()),
        });
    }
    Err(AuthError::Config(
        "JWT_PUBLIC_KEY is not a PEM RSA or EC public key".into(),
    ))
}

/// The algorithms a JWK may verify: its `alg` when it names one (and it fits the key type),
/// else every algorithm of its key type. Symmetric (`oct`) keys are never taken from a JWKS,
/// and encryption keys are skipped.
fn jwk_entry(jwk: &Jwk, template: &Validation) -> Option<KeyEntry> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family_algorithms: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms(),
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(params) if params.curve == EllipticCurve::Ed25519 => {
            AlgorithmFamily::Ed.algorithms()
        }
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        Some(declared) => {
            let declared = Algorithm::try_from(declared).ok()?;
            if !family_algorithms.contains(&declared) {
                return None;
            }
            vec![declared]
        }
        None => family_algorithms.to_vec(),
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(KeyEntry {
        key,
        validation: with_algorithms(template, &algorithms),
    })
}

/// The keys of one fetched JWKS.
#[derive(Default)]
struct JwksKeys {
    by_kid: HashMap<String, KeyEntry>,
    without_kid: Vec<KeyEntry>,
    fetched_at: Option<Instant>,
}

impl JwksKeys {
    /// Parses a JWKS document; keys that are unusable (unknown type, encryption keys,
    /// symmetric keys) are skipped rather than failing the whole set.
    fn parse(body: &[u8], template: &Validation) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_slice(body)?;
        let mut keys = Self {
            fetched_at: Some(Instant::now()),
            ..Self::default()
        };
        for value in set.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            let Some(entry) = jwk_entry(&jwk, template) else {
                tracing::debug!(kid = ?jwk.common.key_id, "Skipping an unusable JWKS key.");
                continue;
            };
            match jwk.common.key_id {
                Some(kid) => {
                    keys.by_kid.insert(kid, entry);
                }
                None => keys.without_kid.push(entry),
            }
        }
        Ok(keys)
    }

    fn all(&self) -> impl Iterator<Item = &KeyEntry> {
        self.by_kid.values().chain(&self.without_kid)
    }

    fn is_stale(&self, max_age: Duration) -> bool {
        self.fetched_at.is_none_or(|at| at.elapsed() >= max_age)
    }
}

/// The JWKS cache: a snapshot read without waiting, and one refresh at a time.
struct Jwks {
    url: Url,
    http: reqwest::Client,
    template: Validation,
    min_refresh: Duration,
    max_age: Duration,
    current: RwLock<Arc<JwksKeys>>,
    /// Held while fetching; holds the time of the last fetch attempt.
    refresh: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    fn new(url: Url, config: &AuthConfig, template: Validation) -> Result<Self, AuthError> {
        let timeout = Duration::from_millis(config.jwt_jwks_timeout_ms);
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|_| AuthError::Config("failed to build the JWKS HTTP client".into()))?;
        Ok(Self {
            url,
            http,
            template,
            min_refresh: Duration::from_secs(config.jwt_jwks_refresh_seconds),
            max_age: Duration::from_secs(config.jwt_jwks_max_age_seconds),
            current: RwLock::new(Arc::default()),
            refresh: tokio::sync::Mutex::new(None),
        })
    }

    fn snapshot(&self) -> Arc<JwksKeys> {
        // A poisoned lock only means a writer panicked between two whole-Arc swaps; the Arc
        // inside is still a complete key set.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn store(&self, keys: JwksKeys) -> Arc<JwksKeys> {
        let keys = Arc::new(keys);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys.clone();
        keys
    }

    /// The current key set, fetched first when it is missing, stale, or lacks `kid`.
    async fn keys(&self, kid: Option<&str>) -> Result<Arc<JwksKeys>, AuthError> {
        let needs_fetch = |keys: &JwksKeys| {
            keys.is_stale(self.max_age) || kid.is_some_and(|kid| !keys.by_kid.contains_key(kid))
        };
        let current = self.snapshot();
        if !needs_fetch(&current) {
            return Ok(current);
        }
        let known =
            current.fetched_at.is_some() && kid.is_none_or(|k| current.by_kid.contains_key(k));
        let mut last_attempt = if known {
            // Only stale: refresh if nobody else is, otherwise serve the cached keys.
            match self.refresh.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(current),
            }
        } else {
            self.refresh.lock().await
        };
        // Another task may have refreshed while this one waited.
        let current = self.snapshot();
        if !needs_fetch(&current) {
            return Ok(current);
        }
        if last_attempt.is_some_and(|at| at.elapsed() < self.min_refresh) {
            return Self::fallback(current);
        }
        *last_attempt = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(
                    url = %self.url,
                    keys = keys.by_kid.len() + keys.without_kid.len(),
                    "Fetched the JWKS."
                );
                Ok(self.store(keys))
            }
            Err(error) => {
                tracing::warn!(url = %self.url, %error, "Failed to fetch the JWKS.");
                Self::fallback(current)
            }
        }
    }

    fn fallback(current: Arc<JwksKeys>) -> Result<Arc<JwksKeys>, AuthError> {
        if current.fetched_at.is_some() {
            Ok(current)
        } else {
            Err(AuthError::JwksUnavailable)
        }
    }

    async fn fetch(&self) -> Result<JwksKeys, JwksFetchError> {
        let response = self
            .http
            .get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await?
            .error_for_status()?;
        let body = response.bytes().await?;
        Ok(JwksKeys::parse(&body, &self.template)?)
    }
}

#[derive(Debug, thiserror::Error)]
enum JwksFetchError {
    #[error("failed to request the JWKS: {0}")]
    Http(#[from] reqwest::Error),
    #[error("failed to parse the JWKS: {0}")]
    Json(#[from] serde_json::Error),
}

#[cfg(test)]
mod tests;
