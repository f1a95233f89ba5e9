//! `meridian-smoke`: the end-to-end smoke flow against a running stack, as a user would see
//! it — used by the container-free e2e, the kind e2e and `just demo`, and usable against any
//! deployment:
//!
//! 1. mint a JWT (HS256) for a smoke user allowed to read and write the smoke collection
//!    (which also lets it join the document's room);
//! 2. open a WebSocket to the hub and subscribe to the document's room `doc:<c>:<id>`;
//! 3. `POST /v1/commands` (create) through the gateway with an `Idempotency-Key`;
//! 4. poll `GET /v1/commands/{id}` through the gateway until `succeeded`;
//! 5. `GET /v1/documents/<c>/<id>` through the gateway returns the document;
//! 6. the WebSocket client received the document's event.
//!
//! `meridian-smoke --print-token …` only prints a token (for curl and WebSocket examples).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::{Args, Parser};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(
    version,
    about = "Smoke-test a Meridian stack through its gateway and hub"
)]
struct Cli {
    /// Only print a signed JWT (for curl and WebSocket examples) and exit.
    #[arg(long)]
    print_token: bool,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct TokenArgs {
    /// The HMAC secret the stack verifies tokens with (the stack's auth.jwtSecretRef).
    #[arg(long, env = "SMOKE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// The `iss` claim (the stack's auth.issuer).
    #[arg(long, default_value = "https://auth.example.invalid/")]
    issuer: String,
    /// The `aud` claim (the stack's auth.audience).
    #[arg(long, default_value = "meridian")]
    audience: String,
    /// The `sub` claim.
    #[arg(long, default_value = "meridian-smoke")]
    subject: String,
    /// Further room patterns the token allows (`rooms` claim); repeatable.
    #[arg(long = "room", default_values_t = ["cmd:*".to_owned()])]
    rooms: Vec<String>,
    /// Document patterns the token may read (`read` claim, `<collection>/<id>`); repeatable.
    /// Default: the smoke collection, `<collection>/*`.
    #[arg(long)]
    read: Vec<String>,
    /// Document patterns the token may send commands for (`write` claim); repeatable.
    /// Default: the smoke collection, `<collection>/*`.
    #[arg(long)]
    write: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_seconds: i64,
}

#[derive(Args)]
struct RunArgs {
    /// The API gateway's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// The WebSocket hub's base URL (ws://…; `/ws` is appended).
    #[arg(long, default_value = "ws://127.0.0.1:8085")]
    hub: String,
    /// The document collection the smoke document goes to.
    #[arg(long, default_value = "smoke")]
    collection: String,
    /// How long each step may take, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_seconds: u64,
    /// A W3C `traceparent` to send with the command, so its trace can be found in the trace
    /// backend (`00-<32 hex trace id>-<16 hex span id>-<01 sampled | 00 not>`).
    #[arg(long, value_parser = parse_traceparent)]
    traceparent: Option<String>,
}

fn parse_traceparent(value: &str) -> Result<String, String> {
    let fields: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    match fields[..] {
        [version, trace, span, flags]
            if version == "00" && hex(trace, 32) && hex(span, 16) && hex(flags, 2) =>
        {
            Ok(value.to_ascii_lowercase())
        }
        _ => Err("expected 00-<32 hex digits>-<16 hex digits>-<2 hex digits>".to_owned()),
    }
}

fn mint(args: &TokenArgs, collection: &str) -> anyhow::Result<String> {
    let or_collection = |patterns: &[String]| {
        if patterns.is_empty() {
            vec![format!("{collection}/*")]
        } else {
            patterns.to_vec()
        }
    };
    let grant = common::auth::Grant {
        subject: args.subject.clone(),
        issuer: Some(args.issuer.clone()),
        audience: Some(args.audience.clone()),
        client_id: None,
        rooms: args.rooms.clone(),
        read: or_collection(&args.read),
        write: or_collection(&args.write),
        ttl: Duration::from_secs(u64::try_from(args.ttl_seconds).unwrap_or(0)),
    };
    common::auth::mint_hs256(args.jwt_secret.as_bytes(), &grant).context("cannot sign the token")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let token = mint(&cli.token, &cli.run.collection)?;
    if cli.print_token {
        println!("{token}");
        return Ok(());
    }
    smoke(&cli.run, &token).await
}

async fn smoke(args: &RunArgs, token: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout_seconds);
    let id = uuid::Uuid::now_v7().to_string();
    let room = format!("doc:{}:{id}", args.collection);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    // 2. Subscribe first, so the event cannot be missed.
    let url = format!("{}/ws?token={token}", args.hub.trim_end_matches('/'));
    let (mut ws, _) = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(url.as_str()))
        .await
        .context("timed out connecting to the hub")?
        .context("cannot connect to the hub")?;
    ws.send(Message::text(
        json!({"type": "subscribe", "room": room, "ref": 1}).to_string(),
    ))
    .await?;
    let subscribed = next_json(&mut ws, timeout, |m| {
        m["type"] == "subscribed" || m["type"] == "error"
    })
    .await?;
    ensure!(
        subscribed["type"] == "subscribed",
        "hub refused the subscription: {subscribed}"
    );
    println!("ok   subscribed to {room} on the hub");

    // 3. The command, through the gateway.
    let gateway = args.gateway.trim_end_matches('/');
    let body = json!({
        "type": "create", "collection": args.collection, "id": id,
        "payload": {"message": "hello from meridian-smoke", "at": chrono::Utc::now().to_rfc3339()},
    });
    let mut request = http
        .post(format!("{gateway}/v1/commands"))
        .bearer_auth(token)
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(&body);
    if let Some(traceparent) = &args.traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.context("POST /v1/commands failed")?;
    let status = response.status();
    let accepted: Value = response
        .json()
        .await
        .context("the command answer is not JSON")?;
    ensure!(
        status.as_u16() == 202,
        "POST /v1/commands answered {status}: {accepted}"
    );
    let command_id = accepted["commandId"]
        .as_str()
        .context("no commandId in the answer")?
        .to_owned();
    println!("ok   command {command_id} accepted (202) through the gateway");

    // 4. Until it succeeded.
    let deadline = Instant::now() + timeout;
    loop {
        let status: Value = http
            .get(format!("{gateway}/v1/commands/{command_id}"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        match status["status"].as_str() {
            Some("succeeded") => {
                println!(
                    "ok   command succeeded (document version {})",
                    status["resultVersion"]
                );
                break;
            }
            Some("failed" | "dead_lettered") => bail!("command did not succeed: {status}"),
            _ if Instant::now() > deadline => bail!("command still {status} after {timeout:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    // 5. The document, through the gateway (read model, write model on a miss).
    let response = http
        .get(format!("{gateway}/v1/documents/{}/{id}", args.collection))
        .bearer_auth(token)
        .send()
        .await?;
    let status = response.status();
    let document: Value = response
        .json()
        .await
        .context("the document answer is not JSON")?;
    ensure!(
        status.is_success(),
        "GET /v1/documents answered {status}: {document}"
    );
    ensure!(
        document.to_string().contains("hello from meridian-smoke"),
        "the document does not hold what was written: {document}"
    );
    println!(
        "ok   GET /v1/documents/{}/{id} returned it",
        args.collection
    );

    // 6. The event, pushed by the hub.
    let publication = next_json(&mut ws, timeout, |m| m["type"] == "publication").await?;
    ensure!(
        publication["room"] == room.as_str(),
        "publication for another room: {publication}"
    );
    println!(
        "ok   the hub pushed the event to {room} (offset {})",
        publication["offset"]
    );
    let _ = ws.close(None).await;
    println!(
        "smoke flow passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The next JSON text frame for which `want` holds (others are skipped).
async fn next_json<S>(
    ws: &mut S,
    timeout: Duration,
    want: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("timed out waiting for the hub")?
            .context("the hub closed the connection")??;
        if let Message::Text(text) = frame {
            let value: Value = serde_json::from_str(&text).context("the hub sent invalid JSON")?;
            if want(&value) {
                return Ok(value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_traceparent;

    #[test]
    fn a_traceparent_argument_must_be_a_w3c_version_00_value() {
        let good = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        assert_eq!(parse_traceparent(good).unwrap(), good.to_ascii_lowercase());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        ] {
            assert!(parse_traceparent(bad).is_err(), "{bad}");
        }
    }
}
