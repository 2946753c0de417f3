//! The per-request host state (`T` of `Store<T>`): WASI contexts, resource table, limits and the
//! outbound-request policy.

use wasmtime::StoreLimits;

use crate::egress::{self, Denied, Policy, Sent};
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
    pub(crate) vars: crate::Variables,
}

impl Host {
    /// The `wasi:keyvalue` view of this request's state.
    pub(crate) fn keyvalue(&mut self) -> KvView<'_> {
        KvView { ctx: &self.kv, table: &mut self.table }
    }

    /// The variables view of this request's state.
    pub(crate) fn variables(&mut self) -> crate::variables::VarsView<'_> {
        crate::variables::VarsView(&self.vars)
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

/// The outbound-request policy of an app: only hosts on its allow-list may be called, at
/// addresses the policy allows (see [`crate::egress`]).
pub(crate) struct Egress {
    pub(crate) policy: Policy,
}

type SendFuture = Box<dyn Future<Output = Result<Sent, HttpError>> + Send>;

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let policy = self.policy.clone();
        Box::new(async move {
            let uri = request.uri();
            let host = uri.host().unwrap_or("").to_owned();
            let port = uri.port_u16().or_else(|| match uri.scheme_str() {
                Some("http") => Some(80),
                Some("https") => Some(443),
                _ => None,
            });
            let checked = match port {
                Some(port) => policy.check(&host, port).await,
                None => Err(Denied::NotListed),
            };
            match checked {
                Ok(addrs) => egress::send_to(request, &host, &addrs, options).await,
                Err(denied) => {
                    tracing::info!(host, ?port, ?denied, "outbound request refused");
                    // Drain (and discard) the body the guest is still writing, so that what the
                    // guest sees is the refusal, not a broken body stream.
                    egress::drain(request.into_body()).await;
                    Err(match denied {
                        Denied::NotListed => HttpError::HttpRequestDenied,
                        Denied::Internal(_) => HttpError::DestinationIpProhibited,
                        Denied::Unresolved => HttpError::DestinationNotFound,
                    })
                }
            }
        })
    }
}
