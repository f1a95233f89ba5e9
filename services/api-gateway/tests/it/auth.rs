//! JWT checks at the gateway: accepted, expired, wrong signature, wrong audience, and key
//! rotation through a JWKS whose keys change.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};

use crate::support::*;

async fn status_and_body(
    app: &common::test_support::TestApp,
    authorization: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut request = http().get(app.url("/v1/commands/c1"));
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        challenge,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn tokens_are_accepted_or_refused_with_a_401_problem_and_a_challenge() {
    let upstream = echo_upstream().await;
    let app = start_gateway(&gateway_vars(&upstream.url(), &prefix("jwt"))).await;

    let (status, _, seen) = status_and_body(&app, Some(&bearer("alice"))).await;
    assert_eq!(status, 200);
    assert_eq!(seen["headers"]["x-client-id"], json!(["alice"]));

    let (status, challenge, problem) = status_and_body(&app, None).await;
    assert_eq!(status, 401);
    assert_eq!(challenge.as_deref(), Some("Bearer realm=\"meridian\""));
    assert_eq!(
        problem["type"],
        "https://meridian.dev/problems/unauthorized"
    );

    let mut expired = claims("alice");
    expired["exp"] = json!(get_current_timestamp() - 3600);
    let wrong_signature = token_with("another-secret-that-is-32-bytes-long!", &claims("alice"));
    let mut wrong_audience = claims("alice");
    wrong_audience["aud"] = json!("someone-else");
    let mut wrong_issuer = claims("alice");
    wrong_issuer["iss"] = json!("https://evil.test");
    let cases = [
        (token(&expired), "the token has expired"),
        (wrong_signature, "the token's signature is invalid"),
        (
            token(&wrong_audience),
            "the token's audience is not accepted",
        ),
        (token(&wrong_issuer), "the token's issuer is not accepted"),
        ("garbage".to_owned(), "the token is malformed"),
    ];
    for (token, detail) in cases {
        let (status, challenge, problem) =
            status_and_body(&app, Some(&format!("Bearer {token}"))).await;
        assert_eq!(status, 401, "{detail}");
        let challenge = challenge.unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"meridian\", error=\"invalid_token\""),
            "{challenge}"
        );
        assert!(
            problem["detail"].as_str().unwrap().starts_with(detail),
            "{problem}"
        );
    }

    let metrics = common::test_support::metrics_text(&app.url("")).await;
    for reason in ["expired", "bad_signature", "wrong_audience", "missing"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "jwt_failures_total{{reason={reason}}} missing"
        );
    }
    app.stop().await;
}

const RSA_PRIVATE: &str = include_str!("keys/rsa_private.pem");
const EC_PRIVATE: &str = include_str!("keys/ec_private.pem");

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut jwk = serde_json::to_value(Jwk::from_encoding_key(key, alg).unwrap()).unwrap();
    jwk["kid"] = json!(kid);
    jwk
}

fn signed(key: &EncodingKey, alg: Algorithm, kid: &str, sub: &str) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    format!("Bearer {}", encode(&header, &claims(sub), key).unwrap())
}

#[tokio::test]
async fn a_rotated_jwks_key_is_accepted_after_a_refresh_on_its_unknown_kid() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let ec = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    let set = Arc::new(Mutex::new(
        json!({"keys": [jwk(&rsa, Algorithm::RS256, "key-1")]}),
    ));
    let fetches = Arc::new(Mutex::new(0_u32));
    let jwks = {
        let (set, fetches) = (set.clone(), fetches.clone());
        Server::start(Router::new().route(
            "/jwks.json",
            get(move || {
                let (set, fetches) = (set.clone(), fetches.clone());
                async move {
                    *fetches.lock().unwrap() += 1;
                    axum::Json(set.lock().unwrap().clone())
                }
            }),
        ))
        .await
    };
    let upstream = echo_upstream().await;
    let vars = gateway_vars(&upstream.url(), &prefix("jwks"))
        .with("JWT_SECRET", "")
        .with("JWT_JWKS_URL", format!("{}/jwks.json", jwks.url()))
        .with("JWT_JWKS_REFRESH_SECONDS", "0");
    let app = start_gateway(&vars).await;

    let old = signed(&rsa, Algorithm::RS256, "key-1", "alice");
    assert_eq!(status_and_body(&app, Some(&old)).await.0, 200);
    assert_eq!(status_and_body(&app, Some(&old)).await.0, 200);
    assert_eq!(*fetches.lock().unwrap(), 1, "the key set is cached");

    // The identity provider rotates: key-1 is retired, key-2 (EC) signs new tokens.
    *set.lock().unwrap() = json!({"keys": [jwk(&ec, Algorithm::ES256, "key-2")]});
    let new = signed(&ec, Algorithm::ES256, "key-2", "bob");
    let (status, _, seen) = status_and_body(&app, Some(&new)).await;
    assert_eq!(status, 200);
    assert_eq!(seen["headers"]["x-client-id"], json!(["bob"]));
    assert_eq!(
        *fetches.lock().unwrap(),
        2,
        "one refresh for the unknown kid"
    );

    // The retired key is gone with the refreshed set.
    let (status, _, problem) = status_and_body(&app, Some(&old)).await;
    assert_eq!(status, 401);
    assert_eq!(problem["detail"], "the token's signing key is unknown");
    // An HS256 token naming the new kid (algorithm confusion) is refused.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("key-2".into());
    let forged = encode(&header, &claims("mallory"), &EncodingKey::from_secret(b"x")).unwrap();
    let (status, _, _) = status_and_body(&app, Some(&format!("Bearer {forged}"))).await;
    assert_eq!(status, 401);
    app.stop().await;
}
