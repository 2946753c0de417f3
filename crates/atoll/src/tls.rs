//! `[tls]`: TLS for a site's listeners and for what it and routers send to sites (sync,
//! forwarded requests, health checks), with rustls (ring). Optional mutual TLS: a listener that
//! serves replication and the admin API then takes only clients with a certificate signed by
//! the configured CA, and this process presents its own certificate when it connects.
//!
//! Plain HTTP (h2c for sync) stays the default: `atoll dev` and the README path use it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

/// `[tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This process's certificate chain (PEM): served by a site's listeners, and presented to
    /// peers when `client_auth` is on.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// The CA certificates (PEM) that sign the sites' certificates: what `https://` peers and
    /// sites are verified against (default: the public web roots), and with `client_auth` what
    /// clients of the admin listener must present.
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: the listener serving replication and the admin API (the admin listener, or
    /// the only one) requires a client certificate signed by `ca_file` (default false).
    #[serde(default)]
    pub client_auth: bool,
    /// The name peers' certificates are checked against, when they are reached by address
    /// (pod IPs): e.g. `atoll-site`, a name every site's certificate carries. Default: the host
    /// of the URL.
    pub server_name: Option<String>,
}

/// The TLS settings, loaded: what listeners serve and what outbound connections trust.
#[derive(Clone)]
pub(crate) struct Tls {
    /// For listeners that take anyone (apps, health).
    pub(crate) public: Option<Arc<rustls::ServerConfig>>,
    /// For the listener serving replication and the admin API (client certificates required
    /// with `client_auth`).
    pub(crate) admin: Option<Arc<rustls::ServerConfig>>,
    /// For connections to sites.
    pub(crate) client: Arc<rustls::ClientConfig>,
    /// The name checked in sites' certificates instead of the URL's host.
    pub(crate) server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("serves", &self.public.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Whether anything is configured.
    pub fn is_set(&self) -> bool {
        self.cert_file.is_some()
            || self.key_file.is_some()
            || self.ca_file.is_some()
            || self.client_auth
            || self.server_name.is_some()
    }

    /// Checks the combination (files are read by [`Tls::load`]).
    pub fn validate(&self) -> Result<()> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            bail!("config section [tls]: cert_file and key_file go together");
        }
        if self.client_auth && (self.ca_file.is_none() || self.cert_file.is_none()) {
            bail!(
                "config section [tls]: client_auth needs ca_file (to verify clients) and cert_file/key_file \
                 (to present to peers)"
            );
        }
        if let Some(name) = &self.server_name {
            ServerName::try_from(name.clone())
                .map_err(|_| anyhow::anyhow!("config field tls.server_name: {name:?} is not a DNS name"))?;
        }
        Ok(())
    }
}

impl Tls {
    /// Reads the files; `None` when `[tls]` is empty.
    pub(crate) fn load(config: &TlsConfig) -> Result<Option<Tls>> {
        if !config.is_set() {
            return Ok(None);
        }
        config.validate()?;
        let roots = match &config.ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs(path)? {
                    roots
                        .add(cert)
                        .with_context(|| format!("tls.ca_file {}: not a CA certificate", path.display()))?;
                }
                roots
            }
            None => rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() },
        };
        let roots = Arc::new(roots);
        let identity = match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => Some((certs(cert)?, private_key(key)?)),
            _ => None,
        };
        let (public, admin) = match &identity {
            Some((chain, key)) => {
                let public = server(rustls::ServerConfig::builder().with_no_client_auth(), chain, key)?;
                let admin = if config.client_auth {
                    let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone())
                        .build()
                        .context("tls.ca_file cannot verify client certificates")?;
                    server(rustls::ServerConfig::builder().with_client_cert_verifier(verifier), chain, key)?
                } else {
                    public.clone()
                };
                (Some(public), Some(admin))
            }
            None => (None, None),
        };
        let client = rustls::ClientConfig::builder().with_root_certificates(roots);
        let client = match (&identity, config.client_auth) {
            (Some((chain, key)), true) => client
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .context("tls.cert_file/key_file cannot be used as a client certificate")?,
            _ => client.with_no_client_auth(),
        };
        let server_name = match &config.server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).context("tls.server_name")?),
            None => None,
        };
        Ok(Some(Tls { public, admin, client: Arc::new(client), server_name }))
    }
}

fn server(
    builder: rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = builder
        .with_single_cert(chain.to_vec(), key.clone_key())
        .context("tls.cert_file and tls.key_file do not make a usable certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("no PEM certificate in {}", path.display());
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("cannot read a PEM private key from {}: {e}", path.display()))
}
