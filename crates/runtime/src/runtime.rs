//! The engine, the linker, the epoch ticker and the compile cache: what all apps share.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::app::{App, Pre};
use crate::host::Host;
use crate::{AppSettings, LoadError, RuntimeConfig, RuntimeError, Version, World};

/// The embeddable runtime. Cheap to clone; all clones share one engine and compile cache.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    /// The engine and linker of WASI 0.2 handlers.
    p2: Flavor,
    /// The engine and linker of WASI 0.3 handlers, made at the first such load: the component
    /// model's async support costs every call 3–5 µs, so WASI 0.2 handlers run without it.
    p3: Arc<OnceLock<Flavor>>,
    /// Held while the WASI 0.3 flavor is being made.
    p3_init: Mutex<()>,
    pub(crate) config: RuntimeConfig,
    /// Compiled components by content hash: each distinct upload is compiled once.
    compiled: Mutex<HashMap<Version, Component>>,
    ticker: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Request bodies buffered for guests, all apps together.
    pub(crate) bodies: Arc<crate::budget::BodyBudget>,
    /// Each app's share of the instance pool.
    pub(crate) shares: crate::budget::AppShares,
    /// Instances alive at once, both engines together: `max_instances` site-wide, although
    /// each engine's pool has room for as many.
    pub(crate) instances: Arc<tokio::sync::Semaphore>,
}

/// An engine (with its own instance pool) and the host linked into it.
struct Flavor {
    engine: Engine,
    linker: Linker<Host>,
}

impl Flavor {
    /// The engine and linker of `world`'s handlers.
    fn new(config: &RuntimeConfig, world: World) -> Result<Flavor, RuntimeError> {
        let engine_error = |e: wasmtime::Error| RuntimeError::Engine(format!("{e:#}"));
        let mut cfg = engine_config(config);
        if world == World::Http03 {
            cfg.concurrency_support(true)
                .wasm_component_model_async(true)
                .wasm_component_model_error_context(true);
        }
        let engine = Engine::new(&cfg).map_err(engine_error)?;
        let mut linker = Linker::<Host>::new(&engine);
        // Rust guests import wasi:cli (environment, exit, stdio) and friends beyond the proxy
        // world: link all of WASI 0.2, with no preopened directories and no sockets allowed.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_error)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(engine_error)?;
        // Both wasi:keyvalue versions guests use today, over the same store.
        crate::keyvalue::draft::add_to_linker(&mut linker, Host::keyvalue)
            .and_then(|()| crate::keyvalue::draft2::add_to_linker(&mut linker, Host::keyvalue))
            .map_err(engine_error)?;
        // Spin 2 and 3's synchronous interfaces (spin-sdk 2–5) and wasi:config.
        crate::keyvalue::spin2::add_to_linker(&mut linker, Host::keyvalue)
            .and_then(|()| crate::variables::add_to_linker(&mut linker, Host::variables))
            .map_err(engine_error)?;
        if world == World::Http03 {
            // WASI 0.3 handlers also import 0.2 interfaces (Rust's std does): both are linked.
            wasmtime_wasi::p3::add_to_linker(&mut linker).map_err(engine_error)?;
            wasmtime_wasi_http::p3::add_to_linker(&mut linker).map_err(engine_error)?;
            // Spin 4's key-value interface is async: WASI 0.3 guests only.
            crate::keyvalue::spin::add_to_linker(&mut linker, Host::keyvalue)
                .and_then(|()| crate::variables::add_async_to_linker(&mut linker, Host::variables))
                .map_err(engine_error)?;
        }
        Ok(Flavor { engine, linker })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(ticker) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = ticker.join();
        }
    }
}

impl Runtime {
    /// Creates a runtime: configures the engine (pooling allocator, epoch interruption),
    /// links the WASI 0.2 and wasi:http host, and starts the epoch ticker thread.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let p2 = Flavor::new(&config, World::Http02)?;
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|source| RuntimeError::Cache { path: dir.clone(), source })?;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p3 = Arc::new(OnceLock::<Flavor>::new());
        let ticker = {
            let (engine, p3, stop, tick) = (p2.engine.clone(), p3.clone(), stop.clone(), config.epoch_tick);
            std::thread::Builder::new()
                .name("atoll-epoch".into())
                .spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                        if let Some(p3) = p3.get() {
                            p3.engine.increment_epoch();
                        }
                    }
                })
                .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch thread: {e}")))?
        };
        Ok(Runtime {
            shared: Arc::new(Shared {
                p2,
                p3,
                p3_init: Mutex::new(()),
                bodies: Arc::new(crate::budget::BodyBudget::new(config.max_buffered_body_bytes)),
                shares: crate::budget::AppShares::new(config.max_instances_per_app),
                instances: Arc::new(tokio::sync::Semaphore::new(config.max_instances as usize)),
                config,
                compiled: Mutex::new(HashMap::new()),
                ticker: Mutex::new(Some(ticker)),
                stop,
            }),
        })
    }

    /// The configuration the runtime was created with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.config
    }

    /// Validates, compiles (once per content hash) and pre-instantiates a component, returning an
    /// [`App`] ready to serve requests. Errors say why the component cannot be served.
    pub fn load(&self, name: &str, wasm: &[u8], settings: AppSettings) -> Result<App, LoadError> {
        if settings.limits.max_memory_bytes > self.shared.config.max_memory_bytes {
            return Err(LoadError::Settings(format!(
                "memory cap of {} bytes exceeds this runtime's maximum of {} bytes",
                settings.limits.max_memory_bytes, self.shared.config.max_memory_bytes
            )));
        }
        let version = Version::of(wasm);
        check_header(wasm)?;
        let world = World::of(wasm);
        let flavor = self.flavor(world).map_err(|e| LoadError::Invalid(e.to_string()))?;
        let component = self.compile(flavor, &version, wasm)?;
        let instance_pre = flavor
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::UnsatisfiedImport(format!("{e:#}")))?;
        let pre = match world {
            World::Http02 => {
                Pre::P2(ProxyPre::new(instance_pre).map_err(|e| LoadError::NotAHandler(format!("{e:#}")))?)
            }
            World::Http03 => {
                Pre::P3(ServicePre::new(instance_pre).map_err(|e| LoadError::NotAHandler(format!("{e:#}")))?)
            }
        };
        Ok(App::new(self.shared.clone(), flavor.engine.clone(), name, version, pre, settings))
    }

    /// The engine and linker of `world`'s handlers (the WASI 0.3 ones made at the first call).
    fn flavor(&self, world: World) -> Result<&Flavor, RuntimeError> {
        let shared = &*self.shared;
        if world == World::Http02 {
            return Ok(&shared.p2);
        }
        if let Some(flavor) = shared.p3.get() {
            return Ok(flavor);
        }
        let _making = shared.p3_init.lock().unwrap_or_else(|e| e.into_inner());
        if shared.p3.get().is_none() {
            let flavor = Flavor::new(&shared.config, World::Http03)?;
            let _ = shared.p3.set(flavor);
        }
        Ok(shared.p3.get().expect("set above"))
    }

    /// Compiles with `flavor`'s engine, using the in-memory and on-disk caches.
    fn compile(&self, flavor: &Flavor, version: &Version, wasm: &[u8]) -> Result<Component, LoadError> {
        if let Some(component) = self.shared.compiled.lock().unwrap_or_else(|e| e.into_inner()).get(version) {
            return Ok(component.clone());
        }
        let component = match self.cached_artifact(&flavor.engine, version) {
            Some(component) => component,
            None => {
                let started = std::time::Instant::now();
                let component =
                    Component::new(&flavor.engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
                tracing::info!(%version, ms = started.elapsed().as_millis() as u64, "compiled component");
                self.store_artifact(version, &component);
                component
            }
        };
        self.shared
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(version.clone(), component.clone());
        Ok(component)
    }

    fn artifact_path(&self, version: &Version) -> Option<PathBuf> {
        Some(self.shared.config.cache_dir.as_ref()?.join(format!("{version}.cwasm")))
    }

    /// A compiled artifact from the disk cache. Anything unreadable or made by a differently
    /// configured engine is ignored (and recompiled): the cache is an optimisation only.
    fn cached_artifact(&self, engine: &Engine, version: &Version) -> Option<Component> {
        let path = self.artifact_path(version)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: the cache directory is written only by `store_artifact` below, with artifacts
        // this engine serialized; wasmtime also checks the engine configuration on load.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unusable compiled artifact: {e:#}");
                None
            }
        }
    }

    fn store_artifact(&self, version: &Version, component: &Component) {
        let Some(path) = self.artifact_path(version) else {
            return;
        };
        let result =
            component.serialize().map_err(|e| std::io::Error::other(format!("{e:#}"))).and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "could not cache compiled component: {e}");
        }
    }

    /// Drops the compiled code of a version from the in-memory cache (apps already loaded keep
    /// their own reference).
    pub fn forget(&self, version: &Version) {
        self.shared.compiled.lock().unwrap_or_else(|e| e.into_inner()).remove(version);
    }
}

/// Refuses what is not a component, saying what it is instead.
fn check_header(wasm: &[u8]) -> Result<(), LoadError> {
    if !wasm.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm);
    }
    if wasmparser::Parser::is_core_wasm(wasm) {
        return Err(LoadError::CoreModule);
    }
    if !wasmparser::Parser::is_component(wasm) {
        return Err(LoadError::Invalid("unknown WebAssembly binary version or layer".into()));
    }
    Ok(())
}

/// The engine configuration: see PERF-NOTES in the shared docs for why each setting is here.
/// Public so that the bench's minimal host runs the very same configuration.
pub fn engine_config(config: &RuntimeConfig) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    let instances = config.max_instances;
    pool.total_component_instances(instances)
        // A Rust wasip2 component holds a few core instances (the program and its adapters).
        .total_core_instances(instances.saturating_mul(4))
        .total_memories(instances.saturating_mul(2))
        .max_memories_per_component(2)
        .total_tables(instances.saturating_mul(4))
        .max_tables_per_component(8)
        .total_stacks(instances)
        .max_memory_size(config.max_memory_bytes)
        // Keep the first pages of memories and tables resident between instances and reset
        // them in place (PAGEMAP_SCAN finds what was dirtied) instead of unmapping.
        .linear_memory_keep_resident(4 << 20)
        .table_keep_resident(1 << 20)
        .pagemap_scan(Enabled::Auto);
    let mut cfg = Config::new();
    cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .memory_init_cow(true)
        .concurrency_support(false);
    cfg
}
