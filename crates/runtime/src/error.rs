//! Errors of the runtime, and the one place where a failure becomes an HTTP status.

use http::StatusCode;

/// Why the runtime could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// wasmtime rejected the engine configuration (for example a pool too large for this host).
    #[error("cannot configure the wasm engine: {0}")]
    Engine(String),
    /// The on-disk cache of compiled components could not be created.
    #[error("cannot use the compile cache at {path}: {source}")]
    Cache {
        /// The cache directory.
        path: std::path::PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// Why an uploaded component cannot be served. Each variant's message is meant for the person
/// who uploaded it: it says what is wrong and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The bytes do not start with the WebAssembly magic number.
    #[error("not a WebAssembly binary: the upload does not start with the `\\0asm` magic bytes")]
    NotWasm,
    /// A core module was uploaded where a component is needed.
    #[error(
        "this is a core WebAssembly module, not a component: build the handler with \
         `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    /// The component failed validation or compilation.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports something the host does not provide.
    #[error("the component imports something Atoll does not provide: {0}")]
    UnsatisfiedImport(String),
    /// The component exports neither `wasi:http/incoming-handler@0.2` nor `wasi:http/handler@0.3`.
    #[error(
        "the component exports neither wasi:http/incoming-handler@0.2.x (the WASI 0.2 proxy \
         world) nor wasi:http/handler@0.3.x (WASI 0.3), so it cannot handle requests: {0}"
    )]
    NotAHandler(String),
    /// The component's settings are out of bounds (for example a memory cap above the pool's).
    #[error("invalid app settings: {0}")]
    Settings(String),
}

/// Why a request to a handler did not produce the handler's own response.
///
/// [`HandleError::status`] is the one place where these become HTTP statuses.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The request body is larger than the app's cap.
    #[error("request body exceeds this app's limit of {limit} bytes")]
    RequestBodyTooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// The request body could not be read from the client.
    #[error("could not read the request body: {0}")]
    RequestBody(String),
    /// The handler did not finish within the app's deadline.
    #[error("the handler did not finish within its deadline of {} ms", .deadline.as_millis())]
    Deadline {
        /// The deadline.
        deadline: std::time::Duration,
    },
    /// The handler trapped (panicked, hit `unreachable`, ran out of memory, ...).
    #[error("the handler failed: {0}")]
    Trap(String),
    /// The handler returned without sending a response.
    #[error("the handler returned without sending a response")]
    NoResponse,
    /// The handler reported a wasi:http error code instead of a response.
    #[error("the handler reported an error instead of a response: {0}")]
    GuestError(String),
    /// The response body is larger than the app's cap.
    #[error("response body exceeds this app's limit of {limit} bytes")]
    ResponseBodyTooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// The key-value store failed (I/O error, corrupt file); other apps may still be served.
    #[error("the key-value store is unavailable: {0}")]
    StoreUnavailable(String),
    /// Every instance slot of the pool is in use.
    #[error("the site is at its instance capacity; retry shortly")]
    AtCapacity,
    /// The app holds its whole share of the instance pool.
    #[error("this app is at its share of {limit} instances at once; retry shortly")]
    AppAtCapacity {
        /// Instances one app may hold.
        limit: usize,
    },
    /// The request bodies buffered for guests on this site are at their cap.
    #[error("the site holds {cap} bytes of request bodies already; retry shortly")]
    BodyMemoryFull {
        /// The cap in bytes.
        cap: usize,
    },
    /// The client did not send the whole request body within the app's deadline.
    #[error("the request body did not arrive within {} ms", .deadline.as_millis())]
    RequestBodyTimeout {
        /// The deadline.
        deadline: std::time::Duration,
    },
    /// A host-side failure unrelated to the guest.
    #[error("internal error: {0}")]
    Internal(String),
}

impl HandleError {
    /// The HTTP status a client should get for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            HandleError::RequestBodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HandleError::RequestBody(_) => StatusCode::BAD_REQUEST,
            HandleError::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            HandleError::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
            HandleError::AtCapacity
            | HandleError::AppAtCapacity { .. }
            | HandleError::BodyMemoryFull { .. }
            | HandleError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HandleError::Trap(_)
            | HandleError::NoResponse
            | HandleError::GuestError(_)
            | HandleError::ResponseBodyTooLarge { .. }
            | HandleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
