//! A loaded app version and the request path: a fresh store and instance for every request.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi_http::WasiHttpCtx;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::guest_log::GuestLog;
use crate::host::{Egress, Host};
use crate::keyvalue::{KvCtx, StorageUnavailable};
use crate::response::{Reply, ResponseBody};
use crate::runtime::Shared;
use crate::{AppSettings, HandleError, Version, World};

/// A component pre-instantiated for its world.
pub(crate) enum Pre {
    /// `wasi:http/incoming-handler@0.2`, on the engine without async support.
    P2(ProxyPre<Host>),
    /// `wasi:http/handler@0.3`, on the engine with it.
    P3(ServicePre<Host>),
}

/// One version of one app, compiled and pre-instantiated. Cheap to clone.
///
/// Every call to [`App::handle`] instantiates the component afresh from the pooling allocator,
/// so no state survives from one request to the next.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// The engine of the app's world.
    engine: wasmtime::Engine,
    name: Arc<str>,
    version: Version,
    pre: Pre,
    settings: AppSettings,
    egress: crate::egress::Policy,
    /// This app's share of the instance pool (shared with its other versions).
    share: Arc<tokio::sync::Semaphore>,
    /// The key-value store labels of `settings`, shared by its requests.
    kv_labels: Arc<[String]>,
    /// `atoll_instantiation_seconds` for this app (resolved once).
    instantiation: metrics::Histogram,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl App {
    pub(crate) fn new(
        shared: Arc<Shared>,
        engine: wasmtime::Engine,
        name: &str,
        version: Version,
        pre: Pre,
        settings: AppSettings,
    ) -> App {
        let egress = crate::egress::Policy::new(&settings.allowed_hosts);
        let name: Arc<str> = name.into();
        let share = shared.shares.of(&name);
        let instantiation = metrics::histogram!("atoll_instantiation_seconds", "app" => name.to_string());
        let kv_labels = settings.kv_stores.clone().into();
        App {
            inner: Arc::new(Inner {
                shared,
                engine,
                name,
                version,
                pre,
                settings,
                egress,
                share,
                kv_labels,
                instantiation,
            }),
        }
    }

    /// The app's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The content hash of the component this app runs.
    pub fn version(&self) -> &Version {
        &self.inner.version
    }

    /// The `wasi:http` world the app's component serves.
    pub fn world(&self) -> World {
        match self.inner.pre {
            Pre::P2(_) => World::Http02,
            Pre::P3(_) => World::Http03,
        }
    }

    /// The settings the app was loaded with.
    pub fn settings(&self) -> &AppSettings {
        &self.inner.settings
    }

    /// Serves one request with a fresh instance of the handler and reads its response body whole
    /// ([`App::serve`], then the body collected: a failure while it streams is the error).
    pub async fn handle<B>(
        &self,
        request: http::Request<B>,
        request_id: &str,
    ) -> Result<http::Response<Bytes>, HandleError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = self.serve(request, request_id).await?.into_parts();
        Ok(http::Response::from_parts(parts, crate::response::collect(body).await?))
    }

    /// Serves one request with a fresh instance of the handler. An `Arc<atoll_kv::Touched>` in
    /// the request's extensions learns the stamps of what the handler's key-value calls read and
    /// wrote.
    ///
    /// The request body is read (up to the app's cap, within its deadline, counted against the
    /// runtime's body memory) before the guest starts, so a slow client never holds an
    /// instance; then the request takes one of the app's share of instances. The response comes
    /// whole when its body ends within [`crate::STREAM_AFTER`] of its head, else streamed (see
    /// [`ResponseBody`]); either way within the app's deadline and response cap. `request_id`
    /// tags the guest's log lines. The guest runs in a task spawned on the current tokio runtime
    /// (which must be driven), aborted if this future, or a streamed body, is dropped.
    pub async fn serve<B>(
        &self,
        request: http::Request<B>,
        request_id: &str,
    ) -> Result<http::Response<ResponseBody>, HandleError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let inner = &*self.inner;
        let limits = &inner.settings.limits;
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut reservation = inner.shared.bodies.reservation();
        let body = if body.is_end_stream() {
            // Nothing to wait for (no body): no timer either.
            Bytes::new()
        } else {
            let read = crate::budget::read_body(body, declared, limits.max_request_body, &mut reservation);
            match tokio::time::timeout(limits.deadline, read).await {
                Ok(body) => body?,
                Err(_elapsed) => return Err(HandleError::RequestBodyTimeout { deadline: limits.deadline }),
            }
        };
        let Ok(instance) = inner.share.clone().try_acquire_owned() else {
            return Err(HandleError::AppAtCapacity { limit: inner.shared.shares.per_app() });
        };
        // The site-wide cap, over both engines' pools (WASI 0.2 and 0.3 handlers together).
        let Ok(site_instance) = inner.shared.instances.clone().try_acquire_owned() else {
            return Err(HandleError::AtCapacity);
        };
        let request = http::Request::from_parts(parts, http_body_util::Full::new(body));
        let deadline = limits.deadline;
        let request_id: Arc<str> = request_id.into();
        let (mut reply, head) = Reply::new(inner.name.clone(), request_id.clone());
        // The guest runs in a task of its own (as in wasmtime-wasi-http's serving example): run
        // inline, inside the connection's task, the same request cost ~20 µs more CPU on the
        // 2-core bench machine (`cargo xtask bench`; ARCHITECTURE.md, "Performance"). The task
        // is aborted if the caller goes (a client that hangs up frees its instance).
        let app = self.clone();
        let mut task = Abortable(tokio::spawn(async move {
            match tokio::time::timeout(deadline, app.run(request, request_id, &mut reply)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => reply.fail(e),
                Err(_elapsed) => reply.fail(HandleError::Deadline { deadline }),
            }
            // The app's share, the site's instance and the request body's bytes are held until
            // the guest is done.
            drop((instance, site_instance, reservation));
            reply.outcome()
        }));
        // A whole response (nearly always) is the task's answer, once its guest is done, so that
        // its instance is back before the caller sends another request; a streamed one's head
        // comes first, and its body holds the task.
        let streamed = tokio::select! {
            biased;
            joined = task.join() => match joined {
                Ok(Some(outcome)) => return outcome,
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(app = %self.inner.name, "a request's task failed: {e}");
                    None
                }
            },
            () = head.wait() => head.take(),
        };
        match streamed.or_else(|| head.take()) {
            Some(mut response) => {
                response.body_mut().hold(task);
                Ok(response)
            }
            None => Err(HandleError::Internal("the request's task ended without an answer".into())),
        }
    }

    /// Runs the guest on `request` and sends its response to `reply`.
    async fn run(
        &self,
        request: http::Request<http_body_util::Full<Bytes>>,
        request_id: Arc<str>,
        reply: &mut Reply,
    ) -> Result<(), HandleError> {
        match &self.inner.pre {
            Pre::P2(pre) => self.run_p2(pre, request, request_id, reply).await,
            Pre::P3(pre) => self.run_p3(pre, request, request_id, reply).await,
        }
    }

    /// A fresh store for one request (`touched`: where its key-value calls note what they saw): WASI with the guest's environment and its
    /// output as log events, the memory cap, and the deadline's epoch callback.
    fn new_store(&self, request_id: Arc<str>, touched: Option<Arc<atoll_kv::Touched>>) -> Store<Host> {
        let inner = &*self.inner;
        let limits = &inner.settings.limits;
        let (stdout, stderr) = GuestLog::pair(inner.name.clone(), request_id);
        let mut wasi = WasiCtx::builder();
        wasi.envs(&inner.shared.config.guest_env)
            .stdout(stdout)
            .stderr(stderr)
            .allow_tcp(false)
            .allow_udp(false);
        let host = Host {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new().memory_size(limits.max_memory_bytes).build(),
            egress: Egress { policy: inner.egress.clone() },
            kv: KvCtx {
                store: inner.shared.config.kv.clone(),
                app: inner.name.clone(),
                labels: inner.kv_labels.clone(),
                in_flight: Default::default(),
                touched,
            },
            vars: inner.settings.variables.clone(),
        };
        let mut store = Store::new(&inner.engine, host);
        store.limiter(|host| &mut host.limits);
        // At every epoch tick a running guest yields to the executor, so a guest that computes
        // without pause cannot starve the other requests on its thread; past the deadline it is
        // interrupted (`Trap::Interrupt`, reported as a deadline).
        let deadline_at = std::time::Instant::now() + limits.deadline;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if std::time::Instant::now() >= deadline_at {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        store
    }

    /// A WASI 0.2 handler: `incoming-handler.handle` with a response outparam.
    async fn run_p2(
        &self,
        pre: &ProxyPre<Host>,
        mut request: http::Request<http_body_util::Full<Bytes>>,
        request_id: Arc<str>,
        reply: &mut Reply,
    ) -> Result<(), HandleError> {
        let inner = &*self.inner;
        let limits = &inner.settings.limits;
        let mut store = self.new_store(request_id, touched(&mut request));
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let incoming = store.data_mut().http().new_incoming_request(Scheme::Http, request);
        let outparam = store.data_mut().http().new_response_outparam(sender);
        let (incoming, outparam) = match (incoming, outparam) {
            (Ok(i), Ok(o)) => (i, o),
            (Err(e), _) | (_, Err(e)) => return Err(HandleError::Internal(format!("{e:#}"))),
        };

        // The guest owns the store: when it returns or traps the store is dropped, which drops
        // the response outparam and so ends `response` below if no response was sent.
        let pre = pre.clone();
        let instantiation = inner.instantiation.clone();
        let guest = async move {
            let started = std::time::Instant::now();
            let proxy = pre.instantiate_async(&mut store).await.map_err(instantiate_error)?;
            instantiation.record(started.elapsed().as_secs_f64());
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, incoming, outparam)
                .await
                .map_err(|e| guest_error(e, limits.deadline))?;
            Ok(store)
        };
        let max_body = limits.max_response_body;
        let response = async move {
            let response = match receiver.await {
                Ok(Ok(response)) => response,
                Ok(Err(code)) => return Err(HandleError::GuestError(format!("{code:?}"))),
                Err(_) => return Err(HandleError::NoResponse),
            };
            reply.send(response, max_body).await
        };
        // Both halves run in this task: the guest writes the body while we read it. Whichever
        // ends first decides; a guest failure is the better explanation of a missing response.
        tokio::pin!(guest, response);
        tokio::select! {
            biased;
            guest_result = &mut guest => match guest_result {
                Err(e) => Err(e),
                // The store lives until the body has ended: a body the guest left open (never
                // finished) stays open, to the deadline, rather than ending as if complete.
                Ok(store) => {
                    let result = response.await;
                    drop(store);
                    result
                }
            },
            response_result = &mut response => response_result,
        }
    }

    /// A WASI 0.3 handler: `handler.handle` returns the response, whose body the guest may go
    /// on writing after returning. All of it runs in the store's event loop
    /// (`run_concurrent`), which must keep running until the body is read; the caller's
    /// timeout around the whole run is the deadline (wasmtime advises against timing out
    /// inside the loop).
    async fn run_p3(
        &self,
        pre: &ServicePre<Host>,
        mut request: http::Request<http_body_util::Full<Bytes>>,
        request_id: Arc<str>,
        reply: &mut Reply,
    ) -> Result<(), HandleError> {
        let inner = &*self.inner;
        let limits = &inner.settings.limits;
        let (deadline, max_body) = (limits.deadline, limits.max_response_body);
        let mut store = self.new_store(request_id, touched(&mut request));
        let started = std::time::Instant::now();
        let service = pre.instantiate_async(&mut store).await.map_err(instantiate_error)?;
        inner.instantiation.record(started.elapsed().as_secs_f64());
        let run = store.run_concurrent(async move |accessor| {
            // The request's I/O result future, boxed: its type names the hooks' borrow.
            type RequestIo =
                std::pin::Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>>;
            let (request, request_io) = accessor.with(|mut access| {
                let (request, io) =
                    wasmtime_wasi_http::p3::Request::from_http(access.get().http().hooks, request);
                (request, Box::pin(io) as RequestIo)
            });
            let response = match service.handle(accessor, request).await {
                Ok(Ok(response)) => response,
                Ok(Err(code)) => return Err(HandleError::GuestError(format!("{code:?}"))),
                Err(e) => return Err(guest_error(e, deadline)),
            };
            let response = accessor
                .with(|mut access| response.into_http(&mut access, request_io))
                .map_err(|e| HandleError::GuestError(format!("{e:#}")))?;
            reply.send(response, max_body).await
        });
        match run.await {
            Ok(result) => result,
            Err(e) => Err(guest_error(e, deadline)),
        }
    }
}

/// A task aborted when its handle is dropped.
pub(crate) struct Abortable<T>(tokio::task::JoinHandle<T>);

impl<T> Abortable<T> {
    /// Waits for the task to end.
    async fn join(&mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for Abortable<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn instantiate_error(e: wasmtime::Error) -> HandleError {
    // The pooling allocator reports exhaustion as a `PoolConcurrencyLimitError`.
    if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
        HandleError::AtCapacity
    } else {
        HandleError::Trap(format!("instantiation failed: {e:#}"))
    }
}

fn guest_error(e: wasmtime::Error, deadline: std::time::Duration) -> HandleError {
    if let Some(unavailable) = e.downcast_ref::<StorageUnavailable>() {
        return HandleError::StoreUnavailable(unavailable.0.clone());
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => HandleError::Deadline { deadline },
        _ => HandleError::Trap(format!("{e:#}")),
    }
}

/// The request's [`atoll_kv::Touched`], taken out of its extensions (the guest does not see it):
/// where the caller of [`App::serve`] asks to learn what the handler's key-value calls read and
/// wrote (a site builds the response's session token from it).
fn touched<B>(request: &mut http::Request<B>) -> Option<Arc<atoll_kv::Touched>> {
    request.extensions_mut().remove::<Arc<atoll_kv::Touched>>()
}
