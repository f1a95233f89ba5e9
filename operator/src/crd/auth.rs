//! How the API gateway and the WebSocket hub authenticate clients (JWT).
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// How the API gateway validates JWTs: an HMAC secret or a JWKS endpoint, exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.jwtSecretRef) && has(self.jwksUrl))").message(
    "auth.jwtSecretRef and auth.jwksUrl are mutually exclusive: set only one"
))]
#[x_kube(validation = Rule::new("has(self.jwtSecretRef) || has(self.jwksUrl)").message(
    "auth needs either jwtSecretRef or jwksUrl"
))]
pub struct AuthSpec {
    /// A key of a Secret in the stack's namespace holding the HMAC secret that signs tokens.
    /// Mutually exclusive with `jwksUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// The HTTPS URL of the issuer's JSON Web Key Set. Mutually exclusive with
    /// `jwtSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub jwks_url: Option<String>,
    /// The `iss` claim every token must carry.
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: String,
    /// The `aud` claim every token must carry.
    #[schemars(length(min = 1, max = 2048))]
    pub audience: String,
}

/// A Secret in the stack's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a Secret in the stack's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}
