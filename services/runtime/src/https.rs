//! HTTPS for an HTTP endpoint (the tracker's API and dashboard): a listener axum serves from,
//! which does each connection's TLS handshake in a task of its own, so a client that stalls
//! its handshake holds up nobody else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A handshake not finished within this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's certificate chain and key (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl HttpsSettings {
    /// The TLS configuration, or why the files do not make one.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, HttpsError> {
        let pem = |path: &PathBuf| {
            let path = path.clone();
            move |e: rustls::pki_types::pem::Error| HttpsError::Pem {
                path,
                reason: e.to_string(),
            }
        };
        let certs = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(pem(&self.cert_file))?;
        if certs.is_empty() {
            return Err(HttpsError::NoCertificate(self.cert_file.clone()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file).map_err(pem(&self.key_file))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        Ok(config)
    }
}

/// Why an endpoint cannot serve HTTPS (all configuration errors: nothing to retry).
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: no certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("certificate and key: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
}

/// What an HTTP endpoint serves on: plain, or TLS when a certificate is configured.
pub enum HttpListener {
    Plain(TcpListener),
    Tls(TlsListener),
}

impl HttpListener {
    pub fn new(listener: TcpListener, tls: Option<&HttpsSettings>) -> Result<Self, HttpsError> {
        Ok(match tls {
            None => HttpListener::Plain(listener),
            Some(tls) => HttpListener::Tls(TlsListener::new(listener, tls)?),
        })
    }

    /// Serves `app` until `shutdown`.
    pub async fn serve(
        self,
        app: axum::Router,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        match self {
            HttpListener::Plain(l) => serve_on(l, app, shutdown).await,
            HttpListener::Tls(l) => serve_on(l, app, shutdown).await,
        }
    }
}

async fn serve_on<L>(
    listener: L,
    app: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Connections that completed their TLS handshake, for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` until this is dropped.
    pub fn new(listener: TcpListener, settings: &HttpsSettings) -> Result<TlsListener, HttpsError> {
        let acceptor = TlsAcceptor::from(Arc::new(settings.server_config()?));
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: pause instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task ended (it does not, while this exists): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
