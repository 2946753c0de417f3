//! Who may reach what on a site's listeners: the admin API needs the admin token, and so do the
//! status endpoints when `[admin] protect_status` is on; an address that sends wrong tokens
//! again and again is locked out for a while.
//!
//! The admin handlers check the token themselves too ([`super::admin`]); this layer adds the
//! status endpoints and the lockout, in front of every route of a listener.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Site;

/// The status endpoints `[admin] protect_status` puts behind the admin token.
const STATUS_PATHS: [&str; 4] =
    ["/_atoll/ui/state", "/_atoll/sync/status", "/_atoll/router/status", "/metrics"];

/// What a listener's guard checks.
#[derive(Clone)]
pub(crate) struct Guard {
    pub(crate) site: Arc<Site>,
    /// Whether this listener serves the admin API.
    pub(crate) admin: bool,
}

/// The middleware: a request that needs the token and lacks a valid one gets 401 (429 while
/// its address is locked out), before any handler runs.
pub(crate) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let site = &guard.site;
    let path = request.uri().path();
    let admin_api = guard.admin
        && (path == "/_atoll/apps" || path.starts_with("/_atoll/apps/") || path == "/_atoll/backup");
    // `/metrics` on an app's own host is the app's (its handler serves it so); every other
    // status path is this site's on every host.
    let status = site.protect_status
        && STATUS_PATHS.contains(&path)
        && !(path == "/metrics" && super::routing::host_names_an_app(site, request.headers()));
    if admin_api || status {
        let client = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        let sent_token = request.headers().contains_key(header::AUTHORIZATION);
        if let Some(refused) =
            site.lockout.check(client, sent_token, || super::admin::authorize(site, request.headers()))
        {
            return refused;
        }
    }
    next.run(request).await
}

/// Wrong admin tokens per client address (an IPv6 client by its /64: one host holds a whole
/// /64). Past [`Lockout::MAX_FAILURES`] within [`Lockout::WINDOW`], every request that needs
/// the token from that address gets 429 until the window ends, right token or not, so guessing
/// proves nothing. A request without a token is not a guess and does not count. (tower's rate
/// limits count requests to a service, not failures per client, hence this small table.)
#[derive(Debug, Default)]
pub(crate) struct Lockout {
    failures: Mutex<Failures>,
}

#[derive(Debug, Default)]
struct Failures {
    by_client: HashMap<IpAddr, (Instant, u32)>,
    /// When expired entries were last dropped (at most once a second, whatever the load).
    swept: Option<Instant>,
}

/// The key of a client: its address, an IPv6 one cut to its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

impl Lockout {
    pub(crate) const MAX_FAILURES: u32 = 10;
    pub(crate) const WINDOW: Duration = Duration::from_secs(60);
    /// Addresses remembered at most (past it, the expired ones are forgotten).
    const MAX_ADDRESSES: usize = 100_000;

    /// Runs `verify` unless `client` is locked out; counts a failure when a token was sent and
    /// refused. `Some`: the refusal to send.
    fn check(
        &self,
        client: Option<IpAddr>,
        sent_token: bool,
        verify: impl FnOnce() -> Result<(), super::admin::ApiError>,
    ) -> Option<Response> {
        let Some(ip) = client.map(client_key) else { return verify().err().map(IntoResponse::into_response) };
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(since, count)) = failures.by_client.get(&ip)
            && count >= Self::MAX_FAILURES
            && now.duration_since(since) < Self::WINDOW
        {
            let retry = (Self::WINDOW - now.duration_since(since)).as_secs().max(1);
            tracing::warn!(client = %ip, "admin request refused: too many wrong admin tokens");
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(serde_json::json!({
                    "error": format!("too many wrong admin tokens from {ip}; retry in {retry} s")
                })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Some(response);
        }
        let result = verify();
        if result.is_err() && sent_token {
            let failures = &mut *failures;
            if failures.by_client.len() >= Self::MAX_ADDRESSES
                && failures.swept.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            {
                failures.swept = Some(now);
                failures.by_client.retain(|_, (since, _)| now.duration_since(*since) < Self::WINDOW);
            }
            if failures.by_client.len() >= Self::MAX_ADDRESSES && !failures.by_client.contains_key(&ip) {
                // Full of live entries (a flood from many addresses): this one is not counted.
                return result.err().map(IntoResponse::into_response);
            }
            let entry = failures.by_client.entry(ip).or_insert((now, 0));
            if now.duration_since(entry.0) >= Self::WINDOW {
                *entry = (now, 0);
            }
            entry.1 += 1;
            if entry.1 == Self::MAX_FAILURES {
                metrics::counter!("atoll_admin_lockouts_total").increment(1);
                tracing::warn!(client = %ip, "{} wrong admin tokens within a minute: locked out", entry.1);
            }
        }
        result.err().map(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::admin::ApiError;

    fn wrong() -> Result<(), ApiError> {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid admin token"))
    }

    #[test]
    fn wrong_tokens_lock_an_address_out_and_missing_ones_do_not() {
        let lockout = Lockout::default();
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        for _ in 0..50 {
            let refused = lockout.check(Some(a), false, wrong).expect("no token: refused");
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        }
        for _ in 0..Lockout::MAX_FAILURES {
            let refused = lockout.check(Some(a), true, wrong).expect("wrong token: refused");
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        }
        let locked = lockout.check(Some(a), true, || Ok(())).expect("even the right token: refused");
        assert_eq!(locked.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(locked.headers().contains_key(header::RETRY_AFTER));
        assert!(lockout.check(Some(b), true, || Ok(())).is_none(), "another address is not locked out");
    }

    #[test]
    fn an_ipv6_client_is_one_client_per_64() {
        let lockout = Lockout::default();
        for i in 0..Lockout::MAX_FAILURES {
            let ip: IpAddr = format!("2001:db8:0:1::{:x}", i + 1).parse().expect("ip");
            lockout.check(Some(ip), true, wrong).expect("refused");
        }
        let same_64: IpAddr = "2001:db8:0:1:ffff::1".parse().expect("ip");
        let locked = lockout.check(Some(same_64), true, || Ok(())).expect("locked out");
        assert_eq!(locked.status(), StatusCode::TOO_MANY_REQUESTS);
        let other_64: IpAddr = "2001:db8:0:2::1".parse().expect("ip");
        assert!(lockout.check(Some(other_64), true, || Ok(())).is_none());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(client_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }
}
