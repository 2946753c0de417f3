//! The per-request host state (`T` of `Store<T>`): WASI contexts, resource table, limits and the
//! outbound-request policy.

use std::sync::Arc;

use wasmtime::StoreLimits;

use crate::keyvalue::{KvCtx, KvView};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

/// State of one request's store. Built fresh for every request and dropped with it.
pub(crate) struct Host {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) egress: Egress,
    pub(crate) kv: KvCtx,
}

impl Host {
    /// The `wasi:keyvalue` view of this request's state.
    pub(crate) fn keyvalue(&mut self) -> KvView<'_> {
        KvView { ctx: &self.kv, table: &mut self.table }
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.egress }
    }
}

/// The outbound-request policy of an app: only hosts on its allow-list may be called.
pub(crate) struct Egress {
    pub(crate) allowed_hosts: Arc<[String]>,
}

impl Egress {
    /// Whether a request to `authority` (`host` or `host:port`) is allowed. An allow-list entry
    /// without a port allows every port of that host; one with a port allows only that port.
    fn allows(&self, host: &str, port: Option<u16>) -> bool {
        self.allowed_hosts.iter().any(|entry| match entry.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                h.eq_ignore_ascii_case(host) && p.parse::<u16>().ok() == port
            }
            _ => entry.eq_ignore_ascii_case(host),
        })
    }
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let uri = request.uri();
        let host = uri.host().unwrap_or("");
        let port = uri.port_u16().or_else(|| match uri.scheme_str() {
            Some("http") => Some(80),
            Some("https") => Some(443),
            _ => None,
        });
        if !self.allows(host, port) {
            tracing::info!(host, "outbound request denied: host is not on the app's allow-list");
            // Drain (and discard) the body the guest is still writing, so that what the guest
            // sees is the response error `http-request-denied`, not a broken body stream.
            return Box::new(async move {
                use http_body_util::BodyExt;
                let mut body = request.into_body();
                while let Some(Ok(_)) = body.frame().await {}
                Err(HttpError::HttpRequestDenied)
            });
        }
        let default: &mut dyn WasiHttpHooks = Default::default();
        default.send_request(request, options, fut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_host_and_optional_port() {
        let egress = Egress { allowed_hosts: vec!["api.example.com".into(), "127.0.0.1:8080".into()].into() };
        assert!(egress.allows("api.example.com", Some(443)));
        assert!(egress.allows("API.example.com", Some(80)));
        assert!(egress.allows("127.0.0.1", Some(8080)));
        assert!(!egress.allows("127.0.0.1", Some(8081)));
        assert!(!egress.allows("example.com", Some(443)));
        assert!(!egress.allows("evil.api.example.com", Some(443)));
        let empty = Egress { allowed_hosts: Vec::new().into() };
        assert!(!empty.allows("api.example.com", Some(443)));
    }
}
