//! Discovery by DNS, with `hickory-resolver`.
//!
//! A site or peer may be given as
//! - `http://IP:PORT`: used as is;
//! - `http://NAME:PORT`: every A/AAAA address of NAME is a site at PORT;
//! - `srv://NAME` (for example `srv://_http._tcp.atoll.default.svc.cluster.local`, what a
//!   Kubernetes headless Service publishes): every SRV target, at its port, every address of it;
//! - the same over TLS: `https://IP:PORT`, `https://NAME:PORT`, `srv+https://NAME`.
//!
//! Names are resolved again every interval (answers are cached no longer than that); a name that
//! stops resolving stops listing its sites, and the router drops them once their health checks
//! fail too.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;

/// One configured address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Fixed(String),
    Host { scheme: &'static str, host: String, port: u16 },
    Srv { scheme: &'static str, name: String },
}

fn parse(url: &str) -> Result<Source> {
    let url = url.trim().trim_end_matches('/');
    for (prefix, scheme) in [("srv://", "http"), ("srv+https://", "https")] {
        if let Some(name) = url.strip_prefix(prefix) {
            anyhow::ensure!(!name.is_empty() && !name.contains('/'), "{url:?}: expected {prefix}NAME");
            return Ok(Source::Srv { scheme, name: name.to_owned() });
        }
    }
    let uri: http::Uri = url.parse().map_err(|e| anyhow::anyhow!("{url:?} is not a URL: {e}"))?;
    let (scheme, default_port) = match uri.scheme_str() {
        Some("http") => ("http", 80),
        Some("https") => ("https", 443),
        _ => anyhow::bail!("{url:?}: expected http(s)://HOST:PORT, srv://NAME or srv+https://NAME"),
    };
    let authority = uri.authority().with_context(|| format!("{url:?}: no host"))?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.parse::<IpAddr>().is_ok() {
        return Ok(Source::Fixed(url.to_owned()));
    }
    Ok(Source::Host { scheme, host: host.to_owned(), port: authority.port_u16().unwrap_or(default_port) })
}

/// Whether `url` is a name to resolve (`http://NAME:PORT`, `srv://NAME`) rather than an address.
pub fn is_name(url: &str) -> bool {
    !matches!(parse(url), Ok(Source::Fixed(_)))
}

fn url_of(scheme: &str, addr: SocketAddr) -> String {
    format!("{scheme}://{addr}")
}

/// A set of addresses to keep resolved.
#[derive(Debug)]
pub struct Discovery {
    sources: Vec<Source>,
    resolver: Option<TokioResolver>,
}

impl Discovery {
    /// Parses `urls`; `nameservers` replaces the system's resolvers when not empty. The resolver
    /// is built only when a name needs one. `max_ttl` caps how long answers are cached.
    pub fn new(urls: &[String], nameservers: &[SocketAddr], max_ttl: Duration) -> Result<Discovery> {
        let sources = urls.iter().map(|u| parse(u)).collect::<Result<Vec<_>>>()?;
        let needs_dns = sources.iter().any(|s| !matches!(s, Source::Fixed(_)));
        let resolver = if needs_dns {
            let mut builder = if nameservers.is_empty() {
                TokioResolver::builder_tokio().context("cannot read the system's DNS configuration")?
            } else {
                let mut group = NameServerConfigGroup::new();
                for ns in nameservers {
                    group.merge(NameServerConfigGroup::from_ips_clear(&[ns.ip()], ns.port(), true));
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], group),
                    TokioConnectionProvider::default(),
                )
            };
            let options = builder.options_mut();
            options.positive_max_ttl = Some(max_ttl);
            options.negative_max_ttl = Some(max_ttl);
            options.timeout = Duration::from_secs(2);
            Some(builder.build())
        } else {
            None
        };
        Ok(Discovery { sources, resolver })
    }

    /// Whether any address is a name (and so worth resolving again).
    pub fn is_dynamic(&self) -> bool {
        self.resolver.is_some()
    }

    /// Every site URL the addresses stand for now. A name that does not resolve contributes
    /// nothing (and is logged).
    pub async fn resolve(&self) -> Vec<String> {
        let mut urls = Vec::new();
        for source in &self.sources {
            match self.resolve_one(source).await {
                Ok(found) => urls.extend(found),
                Err(e) => tracing::warn!("DNS discovery: {e:#}"),
            }
        }
        urls.sort();
        urls.dedup();
        urls
    }

    async fn resolve_one(&self, source: &Source) -> Result<Vec<String>> {
        let resolver = || self.resolver.as_ref().context("no resolver");
        match source {
            Source::Fixed(url) => Ok(vec![url.clone()]),
            Source::Host { scheme, host, port } => {
                let ips = resolver()?.lookup_ip(host.as_str()).await.with_context(|| host.to_string())?;
                Ok(ips.iter().map(|ip| url_of(scheme, SocketAddr::new(ip, *port))).collect())
            }
            Source::Srv { scheme, name } => {
                let srv =
                    resolver()?.srv_lookup(name.as_str()).await.with_context(|| format!("SRV {name}"))?;
                let mut urls = Vec::new();
                for record in srv.iter() {
                    let target = record.target().to_utf8();
                    match resolver()?.lookup_ip(target.as_str()).await {
                        Ok(ips) => urls
                            .extend(ips.iter().map(|ip| url_of(scheme, SocketAddr::new(ip, record.port())))),
                        Err(e) => tracing::warn!("DNS discovery: SRV {name} target {target}: {e}"),
                    }
                }
                Ok(urls)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            parse("http://127.0.0.1:8080/").expect("ok"),
            Source::Fixed("http://127.0.0.1:8080".into())
        );
        assert_eq!(parse("http://[::1]:8080").expect("ok"), Source::Fixed("http://[::1]:8080".into()));
        assert_eq!(
            parse("http://atoll-0.atoll:8080").expect("ok"),
            Source::Host { scheme: "http", host: "atoll-0.atoll".into(), port: 8080 }
        );
        assert_eq!(
            parse("srv://_http._tcp.atoll").expect("ok"),
            Source::Srv { scheme: "http", name: "_http._tcp.atoll".into() }
        );
        assert_eq!(
            parse("https://atoll-0.atoll").expect("ok"),
            Source::Host { scheme: "https", host: "atoll-0.atoll".into(), port: 443 }
        );
        assert_eq!(
            parse("srv+https://_admin._tcp.atoll").expect("ok"),
            Source::Srv { scheme: "https", name: "_admin._tcp.atoll".into() }
        );
        assert!(parse("ftp://x:1").is_err());
        assert!(parse("srv://").is_err());
        assert!(parse("nonsense here").is_err());
    }

    #[tokio::test]
    async fn fixed_addresses_need_no_resolver() {
        let d = Discovery::new(&["http://127.0.0.1:1".into()], &[], Duration::from_secs(1)).expect("ok");
        assert!(!d.is_dynamic());
        assert_eq!(d.resolve().await, ["http://127.0.0.1:1"]);
    }
}
