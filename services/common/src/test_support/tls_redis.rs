//! A Redis server that speaks only TLS, for the `rediss://` tests of the services' client and
//! the operator's admin client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A Redis server that speaks only TLS, on a free port, with a certificate for 127.0.0.1
/// from a CA of its own (Debian's `redis-server`, built with TLS); its default user has no
/// password. Killed, and its files removed, on drop.
pub struct TlsRedis {
    child: Child,
    port: u16,
    ca: PathBuf,
    dir: PathBuf,
}

impl TlsRedis {
    /// Starts the server and waits until it accepts TCP connections.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("tls-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).expect("a temporary directory");
        let ca_key = rcgen::KeyPair::generate().expect("a key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test redis CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("a CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("server parameters")
            .signed_by(&key, &issuer)
            .expect("a server certificate");
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("a certificate file");
            path
        };
        let ca = write("ca.crt", ca_cert.pem());
        let crt = write("redis.crt", cert.pem());
        let key = write("redis.key", key.serialize_pem());
        let port = super::free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(&crt)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's, `just deps-up redis`) is on PATH");
        let server = Self {
            child,
            port,
            ca,
            dir,
        };
        super::wait_until(
            "redis-server to listen",
            Duration::from_secs(10),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        server
    }

    /// `rediss://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// The PEM file of the CA that signed the server's certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// The contents of [`Self::ca_file`].
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca).expect("the CA file")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
