//! Outbound requests from guests: the allow-list, the address check, and the connection to the
//! address that was checked.
//!
//! - An entry is `host`, `host:port`, an IP address, `address:port` or `[v6]:port`. Without a port
//!   it allows 80 and 443 only.
//! - A name is resolved by the host, and only addresses that are public, or that an entry names
//!   explicitly, are used: a name that resolves to loopback, private, link-local, shared or
//!   metadata space (127/8, 10/8, 172.16/12, 192.168/16, 169.254/16, 100.64/10, 0/8, ::1, ::,
//!   fc00::/7, fe80::/10, and their IPv4-mapped forms) is refused, so an allowed name that an
//!   attacker points at an internal address reaches nothing.
//! - The connection goes to the checked address itself (no second resolution, so no rebinding
//!   between check and connect); TLS verifies the certificate for the name (webpki roots).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    host: Pattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// A DNS name, lowercase.
    Name(String),
    /// An address named explicitly (internal addresses are reachable only this way).
    Addr(IpAddr),
}

impl AllowedHost {
    /// Parses an entry, or says why it is not one.
    pub fn parse(entry: &str) -> Result<AllowedHost, String> {
        let bad = |why: &str| format!("{entry:?} is not a host, host:port or address ({why})");
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Ok(AllowedHost { host: Pattern::Addr(ip), port: None });
        }
        if let Ok(addr) = entry.parse::<SocketAddr>() {
            return Ok(AllowedHost { host: Pattern::Addr(addr.ip()), port: Some(addr.port()) });
        }
        let (host, port) = match entry.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| bad("port"))?)),
            None => (entry, None),
        };
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad("name"));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(AllowedHost { host: Pattern::Addr(ip), port });
        }
        Ok(AllowedHost { host: Pattern::Name(host.to_ascii_lowercase()), port })
    }

    fn allows_port(&self, port: u16) -> bool {
        match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        }
    }

    fn names(&self, host: &str) -> bool {
        match &self.host {
            Pattern::Name(n) => n.eq_ignore_ascii_case(host),
            Pattern::Addr(ip) => host.parse::<IpAddr>().is_ok_and(|h| h == *ip),
        }
    }
}

/// Not a public unicast address: loopback, private, link-local, shared, benchmarking, reserved,
/// multicast, unspecified, metadata (169.254.169.254, Azure's 168.63.129.16), or an IPv6 form
/// that carries an IPv4 address (mapped, compatible, translated, NAT64, 6to4), whatever that
/// address is. Reachable by a guest only through an entry naming the address.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || [a, b, c, d] == [168, 63, 129, 16]
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embeds_v4 = v6.to_ipv4_mapped().is_some()
                || s[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (and :: and ::1)
                || s[..6] == [0, 0, 0, 0, 0xffff, 0] // IPv4-translated
                || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] // NAT64
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
                || s[0] == 0x2002; // 6to4
            embeds_v4
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
        }
    }
}

/// An app's outbound policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    entries: Arc<[AllowedHost]>,
}

/// Why an outbound request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No entry allows this host and port.
    NotListed,
    /// The name resolves only to addresses a guest may not reach.
    Internal(Vec<IpAddr>),
    /// The name does not resolve.
    Unresolved,
}

impl Policy {
    /// The policy of these entries (already validated at deploy; an unparsable one allows nothing).
    pub(crate) fn new(entries: &[String]) -> Policy {
        Policy { entries: entries.iter().filter_map(|e| AllowedHost::parse(e).ok()).collect() }
    }

    /// Whether `host:port` is on the list at all.
    fn listed(&self, host: &str, port: u16) -> Vec<&AllowedHost> {
        self.entries.iter().filter(|e| e.names(host) && e.allows_port(port)).collect()
    }

    /// The addresses a request to `host:port` may connect to, among `resolved`.
    fn usable(&self, host: &str, port: u16, resolved: &[IpAddr]) -> Result<Vec<SocketAddr>, Denied> {
        if self.listed(host, port).is_empty() {
            return Err(Denied::NotListed);
        }
        if resolved.is_empty() {
            return Err(Denied::Unresolved);
        }
        let named =
            |ip: IpAddr| self.entries.iter().any(|e| e.host == Pattern::Addr(ip) && e.allows_port(port));
        let ok: Vec<SocketAddr> = resolved
            .iter()
            .filter(|&&ip| !is_internal(ip) || named(ip))
            .map(|&ip| SocketAddr::new(ip, port))
            .collect();
        if ok.is_empty() { Err(Denied::Internal(resolved.to_vec())) } else { Ok(ok) }
    }

    /// Checks a request to `host:port`, resolving the name: the addresses to connect to.
    pub(crate) async fn check(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Denied> {
        if self.listed(host, port).is_empty() {
            return Err(Denied::NotListed);
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        let resolved: Vec<IpAddr> = match literal.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match tokio::net::lookup_host((host, port)).await {
                Ok(addrs) => addrs.map(|a| a.ip()).collect(),
                Err(_) => Vec::new(),
            },
        };
        self.usable(host, port, &resolved)
    }
}

/// What a guest's request turns into once it is allowed: the response, and a future that
/// finishes the exchange (what `wasmtime-wasi-http` calls the I/O future).
pub(crate) type Sent = (http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>);

/// Sends `request` to one of `addrs` (in order), over TLS for `https` with the certificate
/// checked for `host`. HTTP/1.1, one connection per request.
pub(crate) async fn send_to(
    mut request: http::Request<WasiBody>,
    host: &str,
    addrs: &[SocketAddr],
    options: Option<RequestOptions>,
) -> Result<Sent, HttpError> {
    let connect_timeout = options.and_then(|o| o.connect_timeout).unwrap_or(Duration::from_secs(30));
    let first_byte = options.and_then(|o| o.first_byte_timeout).unwrap_or(Duration::from_secs(600));
    let tls = request.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
    let mut last = HttpError::ConnectionRefused;
    let mut stream = None;
    for addr in addrs {
        match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(_)) => last = HttpError::ConnectionRefused,
            Err(_) => last = HttpError::ConnectionTimeout,
        }
    }
    let stream = stream.ok_or(last)?;
    let _ = stream.set_nodelay(true);
    // Only the path goes on the wire (the authority is the Host header).
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    if !request.headers().contains_key(http::header::HOST) {
        // Host and port only (never a userinfo part of the authority).
        let host_header = match request.uri().port_u16() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        if let Ok(value) = http::HeaderValue::from_str(&host_header) {
            request.headers_mut().insert(http::header::HOST, value);
        }
    }
    *request.uri_mut() = path.parse().map_err(|_| HttpError::HttpRequestUriInvalid)?;
    let handshake = async {
        if tls {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|_| HttpError::HttpRequestUriInvalid)?;
            let stream = tls_connector().connect(name, stream).await.map_err(HttpError::Tls)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            Ok::<_, HttpError>((sender, Box::pin(conn) as ConnFuture))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            Ok((sender, Box::pin(conn) as ConnFuture))
        }
    };
    let (mut sender, conn) = tokio::time::timeout(connect_timeout, handshake)
        .await
        .map_err(|_| HttpError::ConnectionTimeout)??;
    // The connection is driven beside the request; the I/O future finishes it.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = done_tx.send(conn.await);
    });
    let response = tokio::time::timeout(first_byte, sender.send_request(request))
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)??;
    let response = response.map(|body| body.map_err(HttpError::from).boxed_unsync());
    let io = async move {
        match done_rx.await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(e)) => Err(HttpError::from(e)),
        }
    };
    Ok((response, Box::new(io)))
}

type ConnFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
        Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

/// Drains a refused request's body, so that the guest sees the refusal rather than a broken
/// body stream.
pub(crate) async fn drain(body: WasiBody) {
    let mut body = body;
    while let Some(Ok(_)) = body.frame().await {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().expect("ip")).collect()
    }

    #[test]
    fn entries_parse_and_bad_ones_say_why() {
        for good in
            ["api.example.com", "api.example.com:8443", "127.0.0.1", "127.0.0.1:8080", "[::1]:80", "::1"]
        {
            assert!(AllowedHost::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "x:0", "x:99999", "http://x", "x/y", "-x.com", "a..b"] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_entry_without_a_port_allows_80_and_443_only() {
        let p = Policy::new(&["api.example.com".into(), "127.0.0.1:8080".into()]);
        let public = ips(&["93.184.216.34"]);
        assert!(p.usable("api.example.com", 443, &public).is_ok());
        assert!(p.usable("API.example.com", 80, &public).is_ok());
        assert_eq!(p.usable("api.example.com", 8080, &public), Err(Denied::NotListed));
        assert_eq!(p.usable("evil.api.example.com", 443, &public), Err(Denied::NotListed));
        assert!(p.usable("127.0.0.1", 8080, &ips(&["127.0.0.1"])).is_ok());
        assert_eq!(p.usable("127.0.0.1", 8081, &ips(&["127.0.0.1"])), Err(Denied::NotListed));
        assert_eq!(Policy::new(&[]).usable("api.example.com", 443, &public), Err(Denied::NotListed));
    }

    #[test]
    fn an_allowed_name_that_resolves_inside_reaches_nothing_unless_the_address_is_listed() {
        let p = Policy::new(&["api.example.com".into()]);
        for inside in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:5",
            "64:ff9b:1::1",
            "::7f00:1",
            "::ffff:0:a9fe:a9fe",
            "2002:a00:1::1",
            "fec0::1",
            "198.18.0.1",
            "240.0.0.1",
            "224.0.0.1",
            "168.63.129.16",
            "192.0.0.8",
            "ff02::1",
        ] {
            let denied = p.usable("api.example.com", 443, &ips(&[inside]));
            assert!(matches!(denied, Err(Denied::Internal(_))), "{inside}: {denied:?}");
        }
        // Mixed answers: only the public address is used.
        let mixed = p.usable("api.example.com", 443, &ips(&["127.0.0.1", "93.184.216.34"])).expect("usable");
        assert_eq!(mixed, vec!["93.184.216.34:443".parse().expect("addr")]);
        // Naming the address (and port) explicitly allows it.
        let named = Policy::new(&["api.example.com:8080".into(), "10.0.0.5:8080".into()]);
        assert!(named.usable("api.example.com", 8080, &ips(&["10.0.0.5"])).is_ok());
        assert!(matches!(
            named.usable("api.example.com", 8080, &ips(&["10.0.0.6"])),
            Err(Denied::Internal(_))
        ));
        for public in ["172.32.0.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_internal(public.parse().expect("ip")), "{public}");
        }
    }
}
