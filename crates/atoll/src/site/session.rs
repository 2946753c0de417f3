//! Session tokens: read-your-writes and monotonic reads for a client across sites.
//!
//! Every response carries `x-atoll-session`, a token saying how much of each site's writes the
//! client may have seen: the stamps of what the request read and wrote (atoll-kv's `Touched`:
//! per site, a clock at or after every change of that site's the request saw; a listing counts
//! as seeing all the site held), merged with the token the request brought. A client sends it
//! back (the header, or with `atoll deploy --session-cookie` a cookie the site sets).
//! A site that gets a token checks its frontiers (atoll-sync: how far it holds each other site's
//! writes): if they cover the token it serves; else, while a site it is behind on is live, it
//! waits for replication up to `[consistency] session_wait_ms`, then forwards the request to
//! that site (once: the site it reaches serves it, stale or not); with no such site live it
//! serves the request flagged `x-atoll-stale: 1`, or answers 503 if the app chose
//! `--stale-reads refuse`. ARCHITECTURE.md, "Sessions", states the contract and its limits.

use std::sync::Arc;
use std::time::Instant;

use atoll_kv::Hlc;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use base64::Engine;

use super::Site;

/// The token's header (request and response).
pub(crate) const HEADER: HeaderName = HeaderName::from_static("x-atoll-session");
/// The cookie carrying the token for apps deployed with `--session-cookie`.
pub(crate) const COOKIE: &str = "atoll-session";
/// Set on a response served without everything the request's token asked for.
pub(crate) const STALE: HeaderName = HeaderName::from_static("x-atoll-stale");
/// Set by a site forwarding a request for its session: the site it reaches serves it.
const FORWARDED: HeaderName = HeaderName::from_static("x-atoll-session-forwarded");
/// The token of a session that has seen nothing yet (`v1.` and `[]`).
const EMPTY: &str = "v1.W10";
/// The most a token may be: a site name per site, with its clock.
const MAX_TOKEN_BYTES: usize = 4096;
const MAX_SITES: usize = 64;

/// Per site name, how far the client may have seen its writes; sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Token(Vec<(String, Hlc)>);

impl Token {
    /// `v1.` and base64url (no padding) of a JSON list of `[name, physical_ms, logical]`:
    /// header- and cookie-safe.
    pub(crate) fn encode(&self) -> String {
        let list: Vec<(&str, u64, u32)> =
            self.0.iter().map(|(n, h)| (n.as_str(), h.physical_ms, h.logical)).collect();
        let json = serde_json::to_vec(&list).unwrap_or_default();
        format!("v1.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json))
    }

    pub(crate) fn parse(text: &str) -> Result<Token, String> {
        const WHAT: &str = "x-atoll-session is not a session token Atoll issued";
        if text.len() > MAX_TOKEN_BYTES {
            return Err(format!("{WHAT} (over {MAX_TOKEN_BYTES} bytes)"));
        }
        let body = text.trim().strip_prefix("v1.").ok_or_else(|| format!("{WHAT} (no v1. prefix)"))?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| format!("{WHAT} (not base64url)"))?;
        let list: Vec<(String, u64, u32)> =
            serde_json::from_slice(&json).map_err(|_| format!("{WHAT} (not a list of sites and clocks)"))?;
        if list.len() > MAX_SITES || list.iter().any(|(n, _, _)| n.is_empty() || n.len() > 255) {
            return Err(format!("{WHAT} (too many sites, or a bad site name)"));
        }
        // No site issued a clock this far ahead (none merges stamps past its clock bound): a
        // forged one would hold every request it rides on.
        let horizon = atoll_kv::hlc::wall_ms().saturating_add(60_000);
        let mut token = Token::default();
        for (name, physical_ms, logical) in list {
            if physical_ms > horizon {
                return Err(format!("{WHAT} (a clock in the future)"));
            }
            token.raise(&name, Hlc { physical_ms, logical });
        }
        Ok(token)
    }

    fn raise(&mut self, name: &str, at: Hlc) {
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(i) => self.0[i].1 = self.0[i].1.max(at),
            Err(i) => self.0.insert(i, (name.to_owned(), at)),
        }
    }

    /// The greater of the two for every site.
    fn merged(mut self, other: &[(String, Hlc)]) -> Token {
        for (name, at) in other {
            self.raise(name, *at);
        }
        self
    }
}

/// What a request's session asked for, and how it went.
#[derive(Debug, Default)]
pub(crate) struct Session {
    /// The token the request brought, if any.
    token: Option<Token>,
    /// Served without everything the token asked for: the sites this site is behind on.
    pub(crate) stale: Vec<String>,
    /// The sites this site knows (the token's other names are dropped from the response's).
    known: Vec<String>,
}

/// What to do with a request, as far as its session goes.
pub(crate) enum Arrival {
    /// Serve it here.
    Serve(axum::extract::Request, Session),
    /// Answered already: forwarded to a site that holds what the token asks, or refused.
    Answered(axum::response::Response),
}

/// The token a request brings: the header, else the cookie. A malformed header is an error
/// (400); a malformed cookie is ignored (a browser may keep a cookie another app of the same
/// host mangled, and the next response sets a good one).
fn of_request(headers: &HeaderMap) -> Result<Option<Token>, String> {
    if let Some(value) = headers.get(&HEADER) {
        let text = value.to_str().map_err(|_| "x-atoll-session is not ASCII".to_owned())?;
        return Token::parse(text).map(Some);
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='));
    Ok(cookie.and_then(|c| Token::parse(c).ok()))
}

/// Checks the request's session here, waiting, forwarding or flagging it as the rules say.
pub(crate) async fn arrive(site: &Arc<Site>, mut request: axum::extract::Request) -> Arrival {
    let token = match of_request(request.headers()) {
        Ok(Some(token)) => token,
        Ok(None) => return Arrival::Serve(request, Session::default()),
        Err(e) => {
            return Arrival::Answered(super::routing::text(
                axum::http::StatusCode::BAD_REQUEST,
                format!("{e}\n"),
            ));
        }
    };
    let Some(node) = site.sync.get() else {
        // A site that replicates nothing holds all there is.
        return Arrival::Serve(request, Session { token: Some(token), ..Session::default() });
    };
    let frontiers = node.frontiers();
    // Only sites this one knows (every peer it ever met, cut off or not): a name it never heard
    // of (a forged token, a site long gone) could never be satisfied.
    let known: Vec<String> = node.peers().into_iter().filter_map(|p| p.site).collect();
    let sites = site.router.sites();
    let live = |name: &str| sites.iter().any(|s| s.is_live() && s.snapshot().name.as_deref() == Some(name));
    let needs: Vec<(String, Hlc)> = token
        .0
        .iter()
        .filter(|(name, _)| *name != site.name && known.iter().any(|k| k == name))
        .cloned()
        .collect();
    let behind = |f: &atoll_sync::frontier::Frontiers| -> Vec<String> {
        needs.iter().filter(|(name, at)| !f.covers(name, *at)).map(|(name, _)| name.clone()).collect()
    };
    if behind(frontiers).is_empty() {
        return Arrival::Serve(request, Session { token: Some(token), stale: vec![], known: known.clone() });
    }
    // Only a live site's writes can still arrive: waiting on a dead one is pointless.
    if behind(frontiers).iter().any(|name| live(name)) {
        let started = Instant::now();
        let held = frontiers.wait_until(started + site.session_wait, |f| behind(f).is_empty()).await;
        metrics::histogram!("atoll_session_wait_seconds").record(started.elapsed().as_secs_f64());
        if held {
            metrics::counter!("atoll_session_reads_total", "outcome" => "waited").increment(1);
            return Arrival::Serve(
                request,
                Session { token: Some(token), stale: vec![], known: known.clone() },
            );
        }
    }
    let stale = behind(frontiers);
    // Once: the site reached serves it (with what it has).
    if !request.headers().contains_key(&FORWARDED)
        && let Some(to) = stale.iter().find(|name| live(name))
    {
        if let Ok(me) = HeaderValue::from_str(&site.name) {
            request.headers_mut().insert(FORWARDED, me);
        }
        let to = to.clone();
        match site.router.route_to(request, &to, "session").await {
            Ok(atoll_router::Outcome::Response(response)) => {
                metrics::counter!("atoll_session_reads_total", "outcome" => "forwarded").increment(1);
                return Arrival::Answered(response);
            }
            // It could not be reached (the request was not sent), or it went down meanwhile.
            Ok(atoll_router::Outcome::Local(back, _)) | Err(back) => request = back,
        }
    }
    metrics::counter!("atoll_session_reads_total", "outcome" => "stale").increment(1);
    Arrival::Serve(request, Session { token: Some(token), stale, known })
}

impl Session {
    /// The response's session headers: the token (the clocks of what the request read and
    /// wrote, `touched`, merged with the request's), the cookie for apps that chose it, and the
    /// stale flag.
    pub(crate) fn apply(
        &self,
        site: &Site,
        cookie: bool,
        touched: &[(String, Hlc)],
        headers: &mut HeaderMap,
    ) {
        let value = match &self.token {
            None if touched.is_empty() => Some(HeaderValue::from_static(EMPTY)),
            None => HeaderValue::from_str(&Token(touched.to_vec()).encode()).ok(),
            Some(token) => {
                // Names neither held here nor known are dropped: a token cannot grow without bound.
                let seen = site.kv.seen();
                let mut token = token.clone().merged(touched);
                token.0.retain(|(name, _)| {
                    *name == site.name
                        || seen.iter().any(|(n, _)| n == name)
                        || self.known.iter().any(|k| k == name)
                });
                HeaderValue::from_str(&token.encode()).ok()
            }
        };
        // Only Atoll sets its session cookie (an app sharing the host cannot plant one).
        if headers.get_all(header::SET_COOKIE).iter().any(|v| v.as_bytes().starts_with(COOKIE.as_bytes())) {
            let kept: Vec<HeaderValue> = headers
                .get_all(header::SET_COOKIE)
                .iter()
                .filter(|v| !v.as_bytes().starts_with(format!("{COOKIE}=").as_bytes()))
                .cloned()
                .collect();
            headers.remove(header::SET_COOKIE);
            for v in kept {
                headers.append(header::SET_COOKIE, v);
            }
        }
        if let Some(value) = value {
            if cookie
                && let Ok(set) = HeaderValue::from_str(&format!(
                    "{COOKIE}={}; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax",
                    value.to_str().unwrap_or_default()
                ))
            {
                headers.append(header::SET_COOKIE, set);
            }
            headers.insert(HEADER, value);
        }
        if !self.stale.is_empty() {
            headers.insert(STALE, HeaderValue::from_static("1"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Hlc {
        Hlc { physical_ms: ms, logical: 1 }
    }

    #[test]
    fn a_token_round_trips_and_merges_to_the_greater_clock() {
        let mut t = Token::default();
        t.raise("us-east-1", at(10));
        t.raise("eu-west-1", at(20));
        let parsed = Token::parse(&t.encode()).expect("parses");
        assert_eq!(parsed, t);
        let merged = parsed.merged(&[("eu-west-1".into(), at(15)), ("ap-south-1".into(), at(5))]);
        assert_eq!(
            merged.0,
            vec![("ap-south-1".into(), at(5)), ("eu-west-1".into(), at(20)), ("us-east-1".into(), at(10))]
        );
    }

    #[test]
    fn the_empty_token_is_what_encoding_nothing_gives() {
        assert_eq!(Token::default().encode(), EMPTY);
        assert_eq!(Token::parse(EMPTY), Ok(Token::default()));
    }

    #[test]
    fn a_bad_token_is_a_clear_error_and_a_bad_cookie_is_ignored() {
        for bad in ["", "v2.abc", "v1.!!!", "v1.e30", &format!("v1.{}", "A".repeat(5000))] {
            let e = Token::parse(bad).expect_err(bad);
            assert!(e.contains("not a session token"), "{e}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; atoll-session=v1.bad; b=2"));
        assert_eq!(of_request(&headers), Ok(None));
        headers.insert(&HEADER, HeaderValue::from_static("nonsense"));
        assert!(of_request(&headers).is_err());
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut t = Token::default();
        t.raise("a", at(1));
        let mut headers = HeaderMap::new();
        let cookie = format!("x=y; {COOKIE}={}; z=w", t.encode());
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).expect("value"));
        assert_eq!(of_request(&headers), Ok(Some(t)));
    }
}
