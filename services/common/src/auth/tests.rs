use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};

use super::*;

const SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!";
const RSA_PRIVATE: &str = include_str!("testdata/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("testdata/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("testdata/ec_private.pem");
const EC_PUBLIC: &str = include_str!("testdata/ec_public.pem");

fn now() -> i64 {
    get_current_timestamp() as i64
}

fn claims() -> Value {
    json!({ "sub": "alice", "exp": now() + 600 })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn hs256(claims: &Value) -> String {
    hs256_with(SECRET, claims)
}

fn hs256_with(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn secret_config() -> AuthConfig {
    AuthConfig {
        jwt_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    }
}

fn verifier(config: &AuthConfig) -> Verifier {
    Verifier::new(config).unwrap()
}

#[tokio::test]
async fn a_valid_hs256_token_yields_its_claims() {
    let token = hs256(&json!({
        "sub": "alice",
        "exp": now() + 600,
        "client_id": "mobile-app",
        "rooms": ["doc:orders:*", "collection:orders"],
        "iss": "https://idp.example",
    }));
    let claims = verifier(&secret_config()).verify(&token).await.unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.client_id.as_deref(), Some("mobile-app"));
    assert_eq!(claims.rooms, ["doc:orders:*", "collection:orders"]);
    assert_eq!(claims.iss.as_deref(), Some("https://idp.example"));
}

#[tokio::test]
async fn the_client_id_falls_back_to_azp() {
    let token = hs256(&with(claims(), "azp", json!("web")));
    let claims = verifier(&secret_config()).verify(&token).await.unwrap();
    assert_eq!(claims.client_id.as_deref(), Some("web"));
    assert!(claims.rooms.is_empty());
}

#[tokio::test]
async fn an_expired_token_is_refused_beyond_the_leeway_only() {
    let verifier = verifier(&secret_config()); // leeway 30 s
    let within = hs256(&with(claims(), "exp", json!(now() - 10)));
    assert!(verifier.verify(&within).await.is_ok());
    let expired = hs256(&with(claims(), "exp", json!(now() - 120)));
    assert_eq!(verifier.verify(&expired).await, Err(AuthError::Expired));
}

#[tokio::test]
async fn a_token_used_before_nbf_is_refused() {
    let token = hs256(&with(claims(), "nbf", json!(now() + 300)));
    assert_eq!(
        verifier(&secret_config()).verify(&token).await,
        Err(AuthError::NotYetValid)
    );
    let within_leeway = hs256(&with(claims(), "nbf", json!(now() + 5)));
    assert!(
        verifier(&secret_config())
            .verify(&within_leeway)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_token_signed_with_another_secret_is_refused() {
    let token = hs256_with("another-secret-that-is-also-32-bytes-long", &claims());
    assert_eq!(
        verifier(&secret_config()).verify(&token).await,
        Err(AuthError::BadSignature)
    );
}

#[tokio::test]
async fn a_tampered_payload_is_refused() {
    let token = hs256(&claims());
    // Splice another token's payload (`sub: admin`) under the original signature.
    let other = hs256_with("x", &json!({"sub": "admin", "exp": now() + 600}));
    let parts: Vec<&str> = token.split('.').collect();
    let forged_payload = other.split('.').nth(1).unwrap();
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_eq!(
        verifier(&secret_config()).verify(&forged).await,
        Err(AuthError::BadSignature)
    );
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let config = AuthConfig {
        jwt_audience: Some("meridian, other".into()),
        jwt_issuer: Some("https://idp.example".into()),
        ..secret_config()
    };
    let verifier = verifier(&config);
    let good = with(
        with(claims(), "aud", json!("meridian")),
        "iss",
        json!("https://idp.example"),
    );
    assert!(verifier.verify(&hs256(&good)).await.is_ok());
    let listed = with(good.clone(), "aud", json!(["x", "other"]));
    assert!(verifier.verify(&hs256(&listed)).await.is_ok());

    let wrong_aud = with(good.clone(), "aud", json!("someone-else"));
    assert_eq!(
        verifier.verify(&hs256(&wrong_aud)).await,
        Err(AuthError::WrongAudience)
    );
    let mut no_aud = good.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        verifier.verify(&hs256(&no_aud)).await,
        Err(AuthError::WrongAudience)
    );
    let wrong_iss = with(good.clone(), "iss", json!("https://evil.example"));
    assert_eq!(
        verifier.verify(&hs256(&wrong_iss)).await,
        Err(AuthError::WrongIssuer)
    );
    let mut no_iss = good;
    no_iss.as_object_mut().unwrap().remove("iss");
    assert_eq!(
        verifier.verify(&hs256(&no_iss)).await,
        Err(AuthError::WrongIssuer)
    );
}

#[tokio::test]
async fn a_token_with_an_audience_is_refused_when_none_is_configured() {
    let token = hs256(&with(claims(), "aud", json!("somebody")));
    assert_eq!(
        verifier(&secret_config()).verify(&token).await,
        Err(AuthError::WrongAudience)
    );
}

#[tokio::test]
async fn malformed_tokens_are_refused_with_a_reason() {
    let verifier = verifier(&secret_config());
    for token in ["", "not-a-jwt", "a.b", "a.b.c", "....", "e30.e30.e30"] {
        let err = verifier.verify(token).await.unwrap_err();
        assert!(matches!(err, AuthError::Malformed(_)), "{token:?}: {err:?}");
    }
    let missing_sub = hs256(&json!({ "exp": now() + 600 }));
    assert_eq!(
        verifier.verify(&missing_sub).await,
        Err(AuthError::Malformed("the `sub` claim is required".into()))
    );
    let missing_exp = hs256(&json!({ "sub": "alice" }));
    assert_eq!(
        verifier.verify(&missing_exp).await,
        Err(AuthError::Malformed("the `exp` claim is required".into()))
    );
    let empty_sub = hs256(&with(claims(), "sub", json!("")));
    assert!(matches!(
        verifier.verify(&empty_sub).await,
        Err(AuthError::Malformed(_))
    ));
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused() {
    // base64url(`{"alg":"none","typ":"JWT"}`) over a valid token's payload, no signature.
    let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    let valid = hs256(&claims());
    let payload = valid.split('.').nth(1).unwrap();
    let token = format!("{header}.{payload}.");
    let err = verifier(&secret_config()).verify(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::Malformed(_)), "{err:?}");
}

fn rsa_config() -> AuthConfig {
    AuthConfig {
        jwt_public_key: Some(RSA_PUBLIC.into()),
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_against_pem_public_keys() {
    let rsa_key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let token = encode(&Header::new(Algorithm::RS256), &claims(), &rsa_key).unwrap();
    assert_eq!(
        verifier(&rsa_config()).verify(&token).await.unwrap().sub,
        "alice"
    );

    let ec_config = AuthConfig {
        jwt_public_key: Some(EC_PUBLIC.into()),
        ..AuthConfig::default()
    };
    let ec_key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    let token = encode(&Header::new(Algorithm::ES256), &claims(), &ec_key).unwrap();
    assert_eq!(
        verifier(&ec_config).verify(&token).await.unwrap().sub,
        "alice"
    );
    // The EC key does not verify RSA tokens, and vice versa.
    let rsa_token = encode(&Header::new(Algorithm::RS256), &claims(), &rsa_key).unwrap();
    assert_eq!(
        verifier(&ec_config).verify(&rsa_token).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_public_key_is_refused() {
    // The classic algorithm-confusion attack: use the (public) RSA key as an HMAC secret.
    let forged = hs256_with(RSA_PUBLIC, &claims());
    assert_eq!(
        verifier(&rsa_config()).verify(&forged).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
}

#[tokio::test]
async fn both_a_secret_and_a_public_key_can_be_configured() {
    let config = AuthConfig {
        jwt_secret: Some(SECRET.into()),
        ..rsa_config()
    };
    let verifier = verifier(&config);
    assert!(verifier.verify(&hs256(&claims())).await.is_ok());
    let rsa_key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let token = encode(&Header::new(Algorithm::RS256), &claims(), &rsa_key).unwrap();
    assert!(verifier.verify(&token).await.is_ok());
    // Still no confusion: an HMAC token made with the public key fails the secret's check.
    assert_eq!(
        verifier.verify(&hs256_with(RSA_PUBLIC, &claims())).await,
        Err(AuthError::BadSignature)
    );
}

#[tokio::test]
async fn without_any_key_source_authentication_is_disabled() {
    let verifier = verifier(&AuthConfig::default());
    assert!(!verifier.is_enabled());
    assert_eq!(
        verifier.verify(&hs256(&claims())).await,
        Err(AuthError::Disabled)
    );
}

#[test]
fn an_unparsable_public_key_fails_at_start_up() {
    let config = AuthConfig {
        jwt_public_key: Some("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----".into()),
        ..AuthConfig::default()
    };
    assert!(matches!(Verifier::new(&config), Err(AuthError::Config(_))));
}

#[test]
fn the_configuration_parses_from_variables_with_defaults() {
    let vars = crate::config::Vars::from_pairs([
        ("JWT_SECRET", SECRET),
        ("JWT_AUDIENCE", "meridian"),
        ("JWT_JWKS_URL", "https://idp.example/.well-known/jwks.json"),
    ]);
    let config: AuthConfig = vars.parse().unwrap();
    assert_eq!(config.jwt_leeway_seconds, 30);
    assert_eq!(config.jwt_jwks_refresh_seconds, 10);
    assert_eq!(config.jwt_audience.as_deref(), Some("meridian"));
    assert!(!format!("{config:?}").contains(SECRET), "secret leaked");
    assert!(Verifier::new(&config).unwrap().is_enabled());
}

#[test]
fn a_jwks_keeps_signing_keys_and_skips_unusable_ones() {
    let rsa_key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let rsa =
        serde_json::to_value(Jwk::from_encoding_key(&rsa_key, Algorithm::RS256).unwrap()).unwrap();
    let ec_key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    let ec =
        serde_json::to_value(Jwk::from_encoding_key(&ec_key, Algorithm::ES256).unwrap()).unwrap();
    let body = json!({ "keys": [
        with(rsa.clone(), "kid", json!("rsa-1")),
        with(ec, "kid", json!("ec-1")),
        with(with(rsa.clone(), "kid", json!("enc-1")), "use", json!("enc")),
        { "kty": "oct", "kid": "hmac-1", "k": "c2VjcmV0" },
        { "kty": "unknown", "kid": "weird" },
        { "kid": "no-type" },
    ]});
    let template = validation_template(&AuthConfig::default());
    let keys = JwksKeys::parse(body.to_string().as_bytes(), &template).unwrap();
    let mut kids: Vec<&str> = keys.by_kid.keys().map(String::as_str).collect();
    kids.sort_unstable();
    assert_eq!(kids, ["ec-1", "rsa-1"]);
    // The declared `alg` narrows the key to that algorithm.
    assert!(keys.by_kid["rsa-1"].accepts(Algorithm::RS256));
    assert!(!keys.by_kid["rsa-1"].accepts(Algorithm::PS256));
    assert!(keys.by_kid["ec-1"].accepts(Algorithm::ES256));
    assert!(!keys.by_kid["ec-1"].accepts(Algorithm::HS256));

    assert!(JwksKeys::parse(b"not json", &template).is_err());
}

#[test]
fn every_error_has_a_metric_reason_and_says_nothing_secret() {
    let errors = [
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::BadSignature,
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::UnknownKey,
        AuthError::AlgorithmNotAllowed,
        AuthError::Malformed("x".into()),
        AuthError::JwksUnavailable,
        AuthError::Disabled,
    ];
    for error in errors {
        assert!(!error.reason().is_empty());
        assert!(!error.to_string().contains(SECRET));
    }
    assert!(AuthError::JwksUnavailable.is_unavailable());
    assert!(!AuthError::Expired.is_unavailable());
}

#[tokio::test]
async fn a_minted_token_is_accepted_by_the_verifier_of_the_same_stack() {
    let config = AuthConfig {
        jwt_audience: Some("meridian".into()),
        jwt_issuer: Some("https://idp.example".into()),
        ..secret_config()
    };
    let grant = Grant {
        subject: "alice".into(),
        issuer: Some("https://idp.example".into()),
        audience: Some("meridian".into()),
        client_id: Some("cli".into()),
        rooms: vec!["chat:*".into()],
        read: vec!["orders/*".into()],
        write: vec!["orders/a-*".into()],
        ttl: Duration::from_secs(600),
    };
    let token = mint_hs256(SECRET.as_bytes(), &grant).unwrap();
    let claims = verifier(&config).verify(&token).await.unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.client_id.as_deref(), Some("cli"));
    assert_eq!(claims.rooms, ["chat:*"]);
    assert_eq!(claims.read, ["orders/*"]);
    assert_eq!(claims.write, ["orders/a-*"]);
    assert!((claims.exp - now() - 600).abs() <= 2, "exp {}", claims.exp);

    let elsewhere = Grant {
        audience: Some("another-stack".into()),
        ..grant
    };
    let token = mint_hs256(SECRET.as_bytes(), &elsewhere).unwrap();
    assert!(verifier(&config).verify(&token).await.is_err());
}

#[test]
fn the_bearer_token_is_taken_case_insensitively() {
    let headers = |authorization: &'static str| {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static(authorization),
        );
        headers
    };
    assert_eq!(
        bearer_token(&headers("Bearer abc.def.ghi")),
        Some("abc.def.ghi")
    );
    assert_eq!(bearer_token(&headers("bearer  abc")), Some("abc"));
    assert_eq!(bearer_token(&headers("Basic dXNlcjpwYXNz")), None);
    assert_eq!(bearer_token(&headers("Bearer ")), None);
    assert_eq!(bearer_token(&http::HeaderMap::new()), None);
}
