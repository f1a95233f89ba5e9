//! One connection to a Kafka broker speaking the protocol directly, for the Admin API calls
//! librdkafka does not offer to Rust (ACLs and SCRAM credentials). It logs in like the
//! operator's librdkafka clients (SASL PLAIN or SCRAM, over plaintext or TLS); the messages come
//! from `kafka-protocol`, the SASL exchange from `rsasl`. Requests go one at a time.
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    RequestHeader, ResponseHeader, SaslAuthenticateRequest, SaslHandshakeRequest,
};
use kafka_protocol::protocol::{Decodable as _, Encodable as _, HeaderVersion, Request, StrBytes};
use rsasl::prelude::{Mechname, SASLClient, SASLConfig};
use secrecy::ExposeSecret as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::KafkaAccess;
use crate::provision::ProvisionError;

/// The largest response accepted (ACL listings of a busy cluster stay far below it).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// The client id the broker logs.
const CLIENT_ID: &str = "meridian-operator";

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An authenticated connection to one broker.
pub(super) struct Connection {
    stream: Box<dyn Stream>,
    correlation_id: i32,
}

fn error(message: impl std::fmt::Display) -> ProvisionError {
    ProvisionError::Kafka(message.to_string())
}

impl Connection {
    /// Connects to the first of `access`'s bootstrap servers that answers and logs in, over
    /// TLS with `tls` (the cluster's [`connector`]) when `access` asks for TLS.
    pub(super) async fn open(
        access: &KafkaAccess,
        tls: Option<&TlsConnector>,
        timeout: Duration,
    ) -> Result<Self, ProvisionError> {
        let mut last = error("no bootstrap server");
        for server in access
            .bootstrap_servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match tokio::time::timeout(timeout, Self::open_one(server, access, tls)).await {
                Ok(Ok(connection)) => return Ok(connection),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = ProvisionError::Timeout {
                        dependency: "Kafka",
                        timeout,
                    }
                }
            }
        }
        Err(last)
    }

    async fn open_one(
        server: &str,
        access: &KafkaAccess,
        tls: Option<&TlsConnector>,
    ) -> Result<Self, ProvisionError> {
        let (host, _) = server
            .rsplit_once(':')
            .ok_or_else(|| error(format!("bootstrap server {server:?} has no port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect(server)
            .await
            .map_err(|e| error(format!("connecting to {server}: {e}")))?;
        tcp.set_nodelay(true)
            .map_err(|e| error(format!("connecting to {server}: {e}")))?;
        let stream: Box<dyn Stream> = match tls {
            None => Box::new(tcp),
            Some(connector) => {
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| error(format!("{host:?} is no TLS server name: {e}")))?;
                Box::new(
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| error(format!("TLS handshake with {server}: {e}")))?,
                )
            }
        };
        let mut connection = Self {
            stream,
            correlation_id: 0,
        };
        if let Some(credentials) = &access.credentials {
            connection
                .authenticate(
                    access.mechanism.as_str(),
                    &credentials.username,
                    credentials.password.expose_secret(),
                )
                .await
                .map_err(|e| error(format!("{server}: {e}")))?;
        }
        Ok(connection)
    }

    /// SASL: the handshake naming `mechanism`, then the exchange in SaslAuthenticate requests.
    async fn authenticate(
        &mut self,
        mechanism: &str,
        username: &str,
        password: &str,
    ) -> Result<(), ProvisionError> {
        let handshake = self
            .send(
                SaslHandshakeRequest::default()
                    .with_mechanism(StrBytes::from_string(mechanism.to_owned())),
                1,
            )
            .await?;
        if handshake.error_code != 0 {
            let enabled: Vec<&str> = handshake.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(error(format!(
                "the broker does not accept SASL {mechanism} (it accepts: {})",
                enabled.join(", ")
            )));
        }
        let config = SASLConfig::with_credentials(None, username.to_owned(), password.to_owned())
            .map_err(|e| error(format!("SASL: {e}")))?;
        let name = Mechname::parse(mechanism.as_bytes())
            .map_err(|e| error(format!("SASL mechanism {mechanism}: {e}")))?;
        let mut session = SASLClient::new(config)
            .start_suggested(&[name])
            .map_err(|e| error(format!("SASL {mechanism}: {e}")))?;
        let mut input: Option<Bytes> = None;
        loop {
            let mut out = Vec::new();
            let state = session
                .step(input.as_deref(), &mut out)
                .map_err(|e| error(format!("SASL {mechanism} as {username}: {e}")))?;
            if state.has_sent_message() {
                let response = self
                    .send(
                        SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(out)),
                        2,
                    )
                    .await?;
                if response.error_code != 0 {
                    return Err(error(format!(
                        "SASL {mechanism} as {username} refused: {}",
                        response
                            .error_message
                            .as_ref()
                            .map_or("no reason given", |m| m.as_str())
                    )));
                }
                input = Some(response.auth_bytes);
            }
            if !state.is_running() {
                return Ok(());
            }
        }
    }

    /// Sends `request` at `version` and reads its response.
    pub(super) async fn send<R: Request>(
        &mut self,
        request: R,
        version: i16,
    ) -> Result<R::Response, ProvisionError> {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
        let mut frame = BytesMut::new();
        frame.extend_from_slice(&[0; 4]);
        header
            .encode(&mut frame, R::header_version(version))
            .and_then(|()| request.encode(&mut frame, version))
            .map_err(|e| error(format!("encoding a request: {e}")))?;
        let length = u32::try_from(frame.len() - 4).map_err(|_| error("request too large"))?;
        frame[..4].copy_from_slice(&length.to_be_bytes());
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| error(format!("sending a request: {e}")))?;

        let length = self
            .stream
            .read_u32()
            .await
            .map_err(|e| error(format!("reading a response: {e}")))?;
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length > MAX_RESPONSE {
            return Err(error(format!("a response of {length} bytes")));
        }
        let mut body = vec![0; length];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| error(format!("reading a response: {e}")))?;
        let mut body = Bytes::from(body);
        let header = ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .map_err(|e| error(format!("decoding a response: {e}")))?;
        if header.correlation_id != self.correlation_id {
            return Err(error("a response to another request"));
        }
        R::Response::decode(&mut body, version)
            .map_err(|e| error(format!("decoding a response: {e}")))
    }
}

/// TLS trusting `ca_pem` (PEM certificates), or the system's roots without one: built once per
/// cluster (reading the system's roots is file I/O), used by every connection to it.
pub(super) fn connector(ca_pem: Option<&str>) -> Result<TlsConnector, ProvisionError> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| error(format!("the Kafka CA: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| error(format!("the Kafka CA: {e}")))?;
            }
            if roots.is_empty() {
                return Err(error("the Kafka CA holds no PEM certificate"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
