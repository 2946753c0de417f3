//! `atoll site`: one edge site. It serves the deployed apps and the admin API over HTTP.
//!
//! The app table lives in memory (name → loaded [`App`]) and in the redb [`Registry`]; the
//! registry is written first, so what a client saw deployed is what a restarted site serves.

mod admin;
mod backups;
mod deploys;
pub(crate) mod faults;
mod guard;
mod idempotency;
mod kvapi;
mod routing;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use atoll_runtime::{App, Limits, Runtime};

use crate::config::FileConfig;
use crate::registry::{AppRecord, Registry};

/// Everything `atoll site` is started with.
#[derive(Debug)]
pub struct SiteOptions {
    pub name: String,
    pub region: String,
    pub listen: SocketAddr,
    /// Where the admin API and replication are served apart from the apps (`--admin-listen`).
    pub admin_listen: Option<SocketAddr>,
    pub data: PathBuf,
    pub config: FileConfig,
    /// The admin token; `None` only with `--insecure-dev`.
    pub admin_token: Option<String>,
    /// Another admin token accepted too (`ATOLL_ADMIN_TOKEN_ACCEPTED`, during a rotation).
    pub admin_token_accepted: Option<String>,
    /// Peer base URLs (`--peer` and `[sync] peers`).
    pub peers: Vec<String>,
    /// The URL peers reach this site at (default: http://<admin or listen address>).
    pub advertise: Option<String>,
    /// The peer secret; `None`: this site does not replicate (no sync endpoints).
    pub peer_secret: Option<atoll_sync::auth::Secret>,
    /// The deploy keys this site trusts, and the one it signs with.
    pub trust: crate::signing::Trust,
    /// Where `atoll dev` writes the faults it injects (`--dev-faults`; development only).
    pub dev_faults: Option<PathBuf>,
    /// A backup to start a new site from (`--seed`).
    pub seed: Option<PathBuf>,
}

/// The peer secret `--insecure-dev` uses when `ATOLL_PEER_SECRET` is unset: every dev site
/// shares it, so local sites replicate without setup. Never for production.
pub const INSECURE_DEV_PEER_SECRET: &str = "atoll-insecure-dev-peer-secret";

/// A running site's shared state.
pub(crate) struct Site {
    pub(crate) name: String,
    /// The name as the `x-atoll-site` header value (made once).
    pub(crate) name_header: Option<axum::http::HeaderValue>,
    pub(crate) region: String,
    runtime: Runtime,
    registry: Registry,
    kv: atoll_kv::Store,
    apps: RwLock<HashMap<String, Deployed>>,
    /// Where requests go: this site, or a nearer live one.
    pub(crate) router: Arc<atoll_router::Router>,
    /// When the site started, and how long readiness may wait for a first sync.
    started: std::time::Instant,
    ready_timeout: Duration,
    /// Replication, when this site has a peer secret.
    pub(crate) sync: std::sync::OnceLock<Arc<atoll_sync::Node<atoll_kv::Store>>>,
    /// Serialises admin changes, so the registry and the app table change in the same order.
    admin_lock: tokio::sync::Mutex<()>,
    admin_token: Option<String>,
    admin_token_accepted: Option<String>,
    /// Whether the status endpoints need the admin token too.
    protect_status: bool,
    /// Addresses that sent too many wrong admin tokens.
    lockout: guard::Lockout,
    default_limits: Limits,
    /// What any app may be given at most.
    caps: crate::signing::Caps,
    /// Who may deploy: the keys whose signed records this site runs.
    trust: crate::signing::Trust,
    max_upload: u64,
    /// Faults injected by `atoll dev` (development only; see `faults`).
    pub(crate) faults: Option<Arc<faults::Faults>>,
    /// How long a request waits for replication to cover its session token (`[consistency]`).
    session_wait: Duration,
}

/// A deployed app: the loaded version and what the registry says about it.
#[derive(Clone)]
pub(crate) struct Deployed {
    pub(crate) app: App,
    pub(crate) record: AppRecord,
    /// Its request metrics' handles (resolved once, not per request).
    pub(crate) metrics: Arc<crate::metrics::AppMetrics>,
}

impl Deployed {
    pub(crate) fn new(app: App, record: AppRecord) -> Deployed {
        let metrics = Arc::new(crate::metrics::AppMetrics::new(app.name()));
        Deployed { app, record, metrics }
    }
}

impl Site {
    /// Ready for traffic: guests may use the store (not resyncing, clock within the bound, not
    /// refused), and no peers, or a sync with one completed, or the wait is over.
    pub(crate) fn ready(&self) -> bool {
        let Some(node) = self.sync.get() else { return true };
        if node.blocks_readiness() {
            return false;
        }
        let peers: Vec<_> = node.peers().into_iter().filter(|p| p.active()).collect();
        peers.is_empty()
            || peers.iter().any(|p| p.last_sync_ms.is_some())
            || self.started.elapsed() >= self.ready_timeout
    }

    pub(crate) fn app(&self, name: &str) -> Option<App> {
        self.apps.read().unwrap_or_else(|e| e.into_inner()).get(name).map(|d| d.app.clone())
    }

    /// The app deployed under `name`, its metrics and its session choices, to serve a request.
    pub(crate) fn serving(
        &self,
        name: &str,
    ) -> Option<(App, Arc<crate::metrics::AppMetrics>, crate::signing::SessionPolicy)> {
        let apps = self.apps.read().unwrap_or_else(|e| e.into_inner());
        apps.get(name).map(|d| (d.app.clone(), d.metrics.clone(), d.record.settings.session))
    }
}

/// What the history compares from one second to the next.
fn look(site: &Site) -> crate::history::Look {
    let mut sites: std::collections::BTreeMap<String, bool> = site
        .router
        .sites()
        .iter()
        .map(|s| {
            // Live as the status page's table says it (health), not as routing does (which
            // also waits for the site to be ready): a site starting is up, not down.
            let h = s.snapshot();
            (h.name.unwrap_or_else(|| s.url().to_owned()), h.live && !s.is_cut())
        })
        .collect();
    sites.insert(site.name.clone(), true);
    let table = site.router.status_json()["table"].clone();
    let serving = table
        .as_object()
        .map(|t| {
            t.iter()
                .map(|(region, row)| {
                    let serving = row["serving"].as_str().map(str::to_owned);
                    let first = serving.is_some() && row["order"][0].as_str() == serving.as_deref();
                    (region.clone(), (serving, first))
                })
                .collect()
        })
        .unwrap_or_default();
    let apps = site
        .apps
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(n, d)| (n.clone(), d.record.version.clone()))
        .collect();
    let peers = site
        .sync
        .get()
        .map(|node| {
            node.peers()
                .into_iter()
                .filter(|p| p.active() && !p.is_self)
                .filter_map(|p| Some((p.site?, (p.lag_ms, p.bytes_sent + p.bytes_received))))
                .collect()
        })
        .unwrap_or_default();
    crate::history::Look {
        sites,
        serving,
        faults: site.faults.as_ref().and_then(|f| f.status()).map(|f| f.describe()).unwrap_or_default(),
        apps,
        peers,
        kv_ops: atoll_runtime::kv_operations(),
        routes: atoll_router::decisions().into_iter().collect(),
    }
}

/// Opens the data dir, loads every registered app, and serves until SIGINT or SIGTERM.
///
/// Serving runs one single-threaded tokio runtime per server thread, each accepting on its own
/// `SO_REUSEPORT` socket of the same address: no work stealing, no cross-thread wake-ups on the
/// request path (see ARCHITECTURE.md for the measurements behind this).
pub fn run(options: SiteOptions) -> Result<()> {
    crate::metrics::install(&[("site", &options.name), ("region", &options.region)])?;
    std::fs::create_dir_all(&options.data)
        .with_context(|| format!("cannot create the data dir {}", options.data.display()))?;
    let registry = Registry::open(&options.data)?;
    let mut runtime_config = options.config.runtime_config();
    runtime_config.guest_env =
        vec![("ATOLL_SITE".into(), options.name.clone()), ("ATOLL_REGION".into(), options.region.clone())];
    runtime_config.cache_dir = Some(options.data.join("compiled"));
    let kv_path = options.data.join("kv.redb");
    let existed = kv_path.exists();
    let kv = atoll_kv::Store::open(
        &kv_path,
        atoll_kv::StoreConfig::new(options.name.clone()),
        atoll_kv::Clock::system(),
    )
    .with_context(|| format!("cannot open the key-value store {}", kv_path.display()))?;
    runtime_config.kv = Some(kv.clone());
    let runtime = Runtime::new(runtime_config)?;

    let mut apps = HashMap::new();
    for (name, record, wasm) in registry.load_all()? {
        match runtime.load(&name, &wasm, (&record.settings).into()) {
            Ok(app) => {
                tracing::info!(app = %name, version = %record.version, "loaded app");
                apps.insert(name, Deployed::new(app, record));
            }
            Err(e) => {
                tracing::error!(app = %name, version = %record.version, "cannot load a registered app: {e}")
            }
        }
    }

    let routing = options.config.routing(&options.region).or_else(|e| {
        // A site in a region the table does not know still runs; clients without a region
        // header then count as the default router region.
        if options.config.routing.default_region.is_some() {
            return Err(e);
        }
        options.config.routing("us-east")
    })?;
    atoll_router::set_http2(routing.http2);
    let router = Arc::new(atoll_router::Router::for_site(&options.name, &options.region, routing));
    let dev_faults = options.dev_faults.map(|path| Arc::new(faults::Faults::new(path, options.name.clone())));
    if let Some(f) = &dev_faults {
        tracing::warn!(
            "--dev-faults: atoll dev may inject partitions, latency and clock skew into this site"
        );
        faults::load_now(f, &router);
    }
    let site = Arc::new(Site {
        name_header: axum::http::HeaderValue::from_str(&options.name).ok(),
        name: options.name,
        region: options.region,
        router: router.clone(),
        sync: std::sync::OnceLock::new(),
        started: std::time::Instant::now(),
        ready_timeout: options.config.ready_timeout(),
        runtime,
        registry,
        kv: kv.clone(),
        apps: RwLock::new(apps),
        admin_lock: tokio::sync::Mutex::new(()),
        admin_token: options.admin_token,
        admin_token_accepted: options.admin_token_accepted,
        protect_status: options.config.admin.protect_status,
        lockout: guard::Lockout::default(),
        default_limits: options.config.default_limits(),
        caps: options.config.caps(),
        trust: options.trust,
        max_upload: options.config.max_upload(),
        faults: dev_faults,
        session_wait: options.config.session_wait(),
    });
    // What other sites send passes this site's rules for reserved namespaces and deploys (the
    // store holds the rule, so a weak reference: the site owns the store).
    let weak = Arc::downgrade(&site);
    kv.set_admission(Arc::new(move |key, entry| match weak.upgrade() {
        Some(site) => deploys::admit(&site, key, entry).inspect_err(|reason| refused(key, reason)),
        None => Err("the site is stopping".into()),
    }));
    if site.admin_token.is_none() {
        tracing::warn!("--insecure-dev: the admin API accepts requests without a token");
    }
    // Expired Idempotency-Key records go (on a thread of its own: a site may not replicate).
    {
        let site = site.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new()
            .name("atoll-idem-sweep".into())
            .spawn(move || rt.block_on(idempotency::sweep(site)))?;
    }
    // The last 15 minutes, a sample a second (the status page's charts and timeline).
    {
        let site = site.clone();
        std::thread::Builder::new()
            .name("atoll-history".into())
            .spawn(move || crate::history::run(&crate::history::HISTORY, &site.name, || look(&site)))?;
    }
    let sync_rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match &options.seed {
        // Before anyone hears of this site: its first hello says how far back its data reaches.
        Some(path) => match backups::seeding(&site.kv, existed)? {
            backups::Seeding::Fresh => sync_rt
                .block_on(backups::seed(&site, path, options.config.node_config().max_clock_offset_ms))
                .with_context(|| format!("cannot seed this site from {}", path.display()))?,
            backups::Seeding::Done => tracing::info!("seeded before: --seed {} ignored", path.display()),
        },
        None => backups::interrupted(&site.kv)?,
    }
    sync_rt.block_on(deploys::startup(&site))?;

    // TLS for the listeners and for connections to other sites (sync, forwarding, health).
    let tls = crate::tls::Tls::load(&options.config.tls)?;
    if let Some(tls) = &tls {
        atoll_router::set_tls((*tls.client).clone(), tls.server_name.clone());
    }
    let scheme = if tls.as_ref().is_some_and(|t| t.public.is_some()) { "https" } else { "http" };
    let threads = options.config.server_threads();
    let listeners = crate::listen::bind(options.listen, threads)?;
    let addr = listeners[0].local_addr()?;
    // With --admin-listen the admin API and replication have a listener of their own (one
    // thread: they are not the hot path); peers reach the site there.
    let admin_listeners = match options.admin_listen {
        Some(admin) => Some(crate::listen::bind(admin, 1)?),
        None => None,
    };
    let admin_addr = match &admin_listeners {
        Some(l) => Some(l[0].local_addr()?),
        None => None,
    };
    let mut router = admin::routes().fallback(routing::serve_app).with_state(site.clone());
    // At shutdown: tell the replication thread to push what is queued, and hear how much was left.
    let mut flush = None;
    if let Some(secret) = options.peer_secret {
        let me = atoll_sync::message::PeerInfo {
            site: site.name.clone(),
            region: site.region.clone(),
            url: options
                .advertise
                .unwrap_or_else(|| format!("{scheme}://{}", admin_addr.unwrap_or(addr)))
                .trim_end_matches('/')
                .to_owned(),
        };
        // Peers given by DNS name (`http://NAME:PORT`, `srv://NAME`) are resolved by the
        // discovery task below; addresses are peers from the start.
        let discovery = options.config.discovery(&options.peers)?;
        let fixed: Vec<String> =
            options.peers.iter().filter(|p| !atoll_router::dns::is_name(p)).cloned().collect();
        let node = Arc::new(atoll_sync::Node::new(
            kv.clone(),
            me,
            options.config.node_config(),
            &fixed,
            atoll_sync::http::wall_ms(),
        )?);
        let _ = site.sync.set(node.clone());
        let timeout = Duration::from_secs(10);
        let connector = atoll_sync::http::connector(
            tls.as_ref().map(|t| (*t.client).clone()),
            tls.as_ref().and_then(|t| t.server_name.clone()),
            timeout,
        );
        let transport =
            Arc::new(atoll_sync::http::HttpTransport::with_connector(secret.clone(), timeout, connector));
        // Replication goes through the injected faults (none outside atoll dev).
        let faulty = Arc::new(faults::Faulty { inner: transport.clone(), faults: site.faults.clone() });
        let server = atoll_sync::http::Server {
            node: node.clone(),
            secret,
            blobs: Arc::new(deploys::Blobs(site.clone())),
            replays: Default::default(),
        };
        router = atoll_sync::http::routes(Arc::new(server)).merge(router);
        let (site, timing, changes) = (site.clone(), options.config.sync_timing(), kv.changes());
        let dns_interval = options.config.dns_interval();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<usize>();
        let flush_limit = options.config.flush();
        flush = Some((stop_tx, done_rx, flush_limit));
        std::thread::Builder::new().name("atoll-sync".into()).spawn(move || {
            sync_rt.block_on(async move {
                tokio::spawn(deploys::watch(site.clone(), node.clone(), transport.clone()));
                if discovery.is_dynamic() {
                    tokio::spawn(discover_peers(discovery, node.clone(), dns_interval));
                }
                tokio::spawn(route_to_peers(site.router.clone(), node.clone()));
                tokio::spawn(site.router.clone().run_health_checks());
                if let Some(f) = &site.faults {
                    tokio::spawn(faults::watch(f.clone(), site.router.clone()));
                }
                tokio::select! {
                    _ = atoll_sync::driver::run(node.clone(), faulty.clone(), changes, timing) => {}
                    _ = stop_rx => {
                        let left = atoll_sync::driver::flush(&node, &*faulty, flush_limit).await;
                        let _ = done_tx.send(left);
                    }
                }
            })
        })?;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let limits = options.config.connection_limits();
    let guarded = |router: axum::Router, admin: bool| {
        let guard = guard::Guard { site: site.clone(), admin };
        // On the routes only: requests for apps (the fallback) do not pass through it.
        router.route_layer(axum::middleware::from_fn_with_state(guard, guard::guard))
    };
    // Client certificates ([tls] client_auth) are asked for where replication and the admin
    // API are served: the admin listener, or the only one.
    let (public_tls, admin_tls) = match &tls {
        Some(t) => (t.public.clone(), t.admin.clone()),
        None => (None, None),
    };
    let workers = match admin_listeners {
        Some(admin_listeners) => {
            let public = admin::public_routes().fallback(routing::serve_app).with_state(site.clone());
            let public = guarded(public, false);
            let mut workers = crate::listen::serve("atoll", listeners, public, limits, public_tls, &stopped)?;
            let admin = guarded(router, true);
            workers.extend(crate::listen::serve(
                "atoll-admin",
                admin_listeners,
                admin,
                limits,
                admin_tls,
                &stopped,
            )?);
            workers
        }
        None => crate::listen::serve("atoll", listeners, guarded(router, true), limits, admin_tls, &stopped)?,
    };
    // The first line on stdout is for scripts and tests: where the site listens.
    println!("atoll site {} ({}) listening on {scheme}://{addr}", site.name, site.region);
    if let Some(admin) = admin_addr {
        println!("atoll site {} admin API and replication on {scheme}://{admin}", site.name);
    }
    tracing::info!(site = %site.name, region = %site.region, %addr, threads, "site started");

    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(crate::shutdown_signal());
    // Stop accepting, let the requests in flight finish (bounded), then push the last writes
    // to the peers (bounded). Acknowledged writes are durable already; this only makes them
    // leave now rather than when this site next runs.
    let _ = stop.send(true);
    let drained = crate::listen::join(workers, options.config.drain());
    if let Some((stop_sync, flushed, limit)) = flush {
        let _ = stop_sync.send(());
        match flushed.recv_timeout(limit + Duration::from_secs(1)) {
            Ok(0) => tracing::info!("replication flushed"),
            Ok(left) => tracing::warn!(
                keys = left,
                "some writes were not pushed before stopping; peers catch up by anti-entropy when this site is back"
            ),
            Err(_) => tracing::warn!("replication did not flush in time"),
        }
    }
    tracing::info!("stopped");
    drained
}

/// Logs an entry from another site that was not merged (once a minute per key and reason:
/// anti-entropy offers it again every session), and counts it.
fn refused(key: &[u8], reason: &str) {
    type Seen = HashMap<(Vec<u8>, String), std::time::Instant>;
    static LAST: std::sync::Mutex<Option<Seen>> = std::sync::Mutex::new(None);
    metrics::counter!("atoll_sync_entries_refused_total").increment(1);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let last = last.get_or_insert_with(HashMap::new);
    let now = std::time::Instant::now();
    let seen = (key.to_vec(), reason.to_owned());
    if last.get(&seen).is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60)) {
        return;
    }
    if last.len() > 10_000 {
        last.clear();
    }
    last.insert(seen, now);
    tracing::warn!("refused an entry from another site: {reason}");
}

/// Keeps the peers given by DNS name resolved: every address found becomes a peer (a site that
/// moved is recognised by name when it says hello, and its old address dropped).
async fn discover_peers(
    discovery: atoll_router::dns::Discovery,
    node: Arc<atoll_sync::Node<atoll_kv::Store>>,
    interval: Duration,
) {
    loop {
        for url in discovery.resolve().await {
            node.add_peer(&url, atoll_sync::http::wall_ms());
        }
        tokio::time::sleep(interval).await;
    }
}

/// Keeps the routing table's sites the replication peers: every site this one replicates with
/// is a site it may forward to (names and regions as they said hello, confirmed by health checks).
async fn route_to_peers(router: Arc<atoll_router::Router>, node: Arc<atoll_sync::Node<atoll_kv::Store>>) {
    loop {
        let specs: Vec<atoll_router::SiteSpec> = node
            .peers()
            .into_iter()
            .filter(|p| p.active())
            .map(|p| atoll_router::SiteSpec { url: p.url, name: p.site, region: p.region })
            .collect();
        router.set_sites(&specs);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
