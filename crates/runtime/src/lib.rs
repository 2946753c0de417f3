//! `atoll-runtime`: run WebAssembly HTTP handlers with a fresh instance per request.
//!
//! Handlers are components exporting `wasi:http/incoming-handler@0.2` (the WASI 0.2 proxy
//! world) or `wasi:http/handler@0.3` (WASI 0.3), so a handler built for `wasmtime serve` or Spin
//! runs unchanged. The runtime compiles each
//! distinct component once (keyed by its SHA-256), keeps a pre-instantiated [`App`] per version,
//! and serves every request from a fresh instance out of wasmtime's pooling allocator, under
//! per-app [`Limits`]: a deadline (epoch interruption), a linear-memory cap and body caps.
//!
//! Guests get WASI 0.2 with no preopened directories, no sockets, the environment of
//! [`RuntimeConfig::guest_env`], stdout/stderr as `tracing` events (target `atoll::guest`, tagged
//! with app and request id), and outbound `wasi:http` only to the hosts in
//! [`AppSettings::allowed_hosts`], at public addresses unless an entry names the address.
//!
//! This crate knows nothing of sites, storage or routing; it is usable on its own:
//!
//! ```no_run
//! use atoll_runtime::{AppSettings, Runtime, RuntimeConfig};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let wasm = std::fs::read("hello.wasm")?;
//! let app = runtime.load("hello", &wasm, AppSettings::default())?;
//! let request = http::Request::get("http://localhost/").body(String::new())?;
//! match app.handle(request, "req-1").await {
//!     Ok(response) => println!("{}", String::from_utf8_lossy(response.body())),
//!     Err(e) => eprintln!("{} {e}", e.status()),
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod app;
mod budget;
mod config;
mod egress;
mod error;
mod guest_log;
mod host;
mod keyvalue;
mod response;
mod runtime;
mod variables;
mod version;
mod world;

pub use app::App;
pub use config::{AppSettings, Limits, RuntimeConfig};
pub use egress::{AllowedHost, is_internal};
pub use error::{HandleError, LoadError, RuntimeError};
pub use keyvalue::operations as kv_operations;
pub use response::{ResponseBody, STREAM_AFTER};
pub use runtime::{Runtime, engine_config};
pub use variables::{Variables, check_name as check_variable_name, name_rule as variable_name_rule};
pub use version::Version;
pub use world::World;
