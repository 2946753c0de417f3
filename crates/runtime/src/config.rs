//! Configuration of the runtime as a whole and of each app.

use std::path::PathBuf;
use std::time::Duration;

/// How the runtime as a whole is set up. [`Default`] gives values suited to a single site.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// How many handler instances may be alive at once (the pooling allocator's slots).
    /// A request arriving when all are busy gets [`crate::HandleError::AtCapacity`].
    pub max_instances: u32,
    /// How many instances one app may hold at once, so that one app (busy, slow or hostile)
    /// leaves instances for the others; past it its requests get
    /// [`crate::HandleError::AppAtCapacity`]. Default: half of `max_instances`.
    pub max_instances_per_app: u32,
    /// Request bodies buffered for guests, all apps together, in bytes; a request whose body
    /// would pass it gets [`crate::HandleError::BodyMemoryFull`].
    pub max_buffered_body_bytes: usize,
    /// The largest linear memory any app may be allowed, in bytes: the pool's slot size.
    /// Per-app caps ([`Limits::max_memory_bytes`]) must not exceed it.
    pub max_memory_bytes: usize,
    /// How often the epoch ticks: a running guest yields to other requests this often, and its
    /// deadline is checked at this granularity.
    pub epoch_tick: Duration,
    /// Environment variables every guest sees through `wasi:cli/environment`.
    pub guest_env: Vec<(String, String)>,
    /// Where compiled components are cached across restarts. `None`: memory only.
    pub cache_dir: Option<PathBuf>,
    /// The store behind `wasi:keyvalue`. `None`: `open` fails with `no-such-store`.
    pub kv: Option<atoll_kv::Store>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 1000,
            max_instances_per_app: RuntimeConfig::default_per_app(1000),
            max_buffered_body_bytes: 512 << 20,
            max_memory_bytes: 128 << 20,
            epoch_tick: Duration::from_millis(10),
            guest_env: Vec::new(),
            cache_dir: None,
            kv: None,
        }
    }
}

impl RuntimeConfig {
    /// The default per-app share of a pool of `max_instances`: half of it.
    pub fn default_per_app(max_instances: u32) -> u32 {
        (max_instances / 2).max(1)
    }
}

/// What one app's requests may use. [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time a request may take, from instantiation to the last response byte.
    /// A guest running past it is interrupted (epoch interruption) and the client gets 504.
    pub deadline: Duration,
    /// The cap on the guest's linear memory, in bytes; growing past it fails.
    pub max_memory_bytes: usize,
    /// The largest request body passed to the guest; larger requests get 413.
    pub max_request_body: usize,
    /// The largest response body the guest may produce; larger responses become 500.
    pub max_response_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_secs(10),
            max_memory_bytes: 64 << 20,
            max_request_body: 10 << 20,
            max_response_body: 10 << 20,
        }
    }
}

/// Everything an app is configured with besides its code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppSettings {
    /// Resource limits of each request.
    pub limits: Limits,
    /// Hosts the guest may reach with `wasi:http/outgoing-handler`, as `host`, `host:port` or
    /// an address ([`crate::AllowedHost`]; without a port: 80 and 443). A name is used only at
    /// public addresses; an internal one must be listed itself. Empty (the default): no
    /// outbound requests at all.
    pub allowed_hosts: Vec<String>,
    /// Key-value store labels the guest may open through Spin's key-value interfaces besides
    /// `default` (always allowed); any other label is `access-denied`. Each label is a bucket of
    /// the app's, the same one `wasi:keyvalue` opens by that name.
    pub kv_stores: Vec<String>,
    /// The app's variables, read through Spin's variables interfaces and `wasi:config`.
    pub variables: crate::Variables,
}
