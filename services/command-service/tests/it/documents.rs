//! `GET /v1/documents/{collection}/{id}` on the write model (rows written here the way the
//! processor writes them).

use std::time::Duration;

use command_service::CommandService;
use common::test_support::{Deps, TestApp, test_vars};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

#[tokio::test]
async fn a_document_is_served_with_its_version_as_etag_and_deleted_or_missing_ones_are_404() {
    let app = TestApp::start::<CommandService>(&test_vars()).await;
    let ready = app.url("/ready");
    common::test_support::wait_ready(&ready, Duration::from_secs(30)).await;
    let db = PgPool::connect(&Deps::from_env().database_url)
        .await
        .unwrap();
    let collection = format!("c{}", Uuid::new_v4().simple());
    for (id, version, data, deleted) in [
        ("live", 3_i64, Some(json!({"title": "Dune"})), false),
        ("gone", 2, None, true),
    ] {
        sqlx::query(
            "INSERT INTO documents (collection, id, version, data, deleted, last_command_id) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&collection)
        .bind(id)
        .bind(version)
        .bind(data.map(sqlx::types::Json))
        .bind(deleted)
        .bind(Uuid::now_v7())
        .execute(&db)
        .await
        .unwrap();
    }
    let http = reqwest::Client::new();
    let url = |id: &str| app.url(&format!("/v1/documents/{collection}/{id}"));

    let response = http.get(url("live")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["etag"], "\"3\"");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["collection"], collection.as_str());
    assert_eq!(body["id"], "live");
    assert_eq!(body["version"], 3);
    assert_eq!(body["data"], json!({"title": "Dune"}));
    assert!(body["updatedAt"].as_str().unwrap().ends_with('Z'));

    let response = http
        .get(url("live"))
        .header("if-none-match", "\"3\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 304);
    assert_eq!(response.headers()["etag"], "\"3\"");

    for id in ["gone", "never"] {
        let response = http.get(url(id)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 404, "{id}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "https://meridian.dev/problems/not-found");
    }
    // A path that does not decode (bytes that are not UTF-8) is a problem, not plain text.
    let response = http
        .get(app.url(&format!("/v1/documents/{collection}/%ff")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://meridian.dev/problems/validation-failed"
    );
    assert!(
        body["detail"].as_str().unwrap().starts_with("invalid path"),
        "{body}"
    );

    sqlx::query("DELETE FROM documents WHERE collection = $1")
        .bind(&collection)
        .execute(&db)
        .await
        .unwrap();
    app.stop().await;
}
