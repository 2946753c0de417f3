//! The TOML configuration file of `atoll site`, `atoll router` and `atoll dev` (`--config
//! FILE`): one format, each command reads the sections it uses. Every field is optional;
//! unknown fields are errors naming the field. See `examples/site.toml` for a commented example.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use atoll_runtime::{Limits, RuntimeConfig};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub runtime: RuntimeSection,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub routing: atoll_router::RoutingConfig,
    #[serde(default)]
    pub router: RouterSection,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub tls: crate::tls::TlsConfig,
    #[serde(default)]
    pub consistency: ConsistencyConfig,
}

/// `[consistency]`: session tokens (read-your-writes across sites).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyConfig {
    /// How long a site waits for replication to bring what a request's session token asks for
    /// before forwarding it to a site that has it, or answering stale (default 250, at most 10000).
    pub session_wait_ms: Option<u64>,
}

/// `[server]`: what one client connection may cost (sites and routers).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Open connections at once (default 10000); past it, new ones wait to be accepted.
    pub max_connections: Option<usize>,
    /// A connection's first request must arrive whole within this (default 10000).
    pub header_read_timeout_ms: Option<u64>,
    /// A connection with no request in flight this long is closed, and one whose client reads
    /// nothing of its response this long is dropped (default 60000).
    pub idle_timeout_ms: Option<u64>,
}

/// `[shutdown]`: what SIGTERM (or Ctrl-C) does.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long requests in flight may take to finish once new connections are refused
    /// (default 10000).
    pub drain_ms: Option<u64>,
    /// How long pushing the last writes to the peers may take (default 5000).
    pub flush_ms: Option<u64>,
}

/// `[router]`: `atoll router`, the stand-alone front door.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// Its name, in `x-atoll-forwarded-by` and its status (default `router`).
    pub name: Option<String>,
    /// The sites it routes to (added to `--site`): `http://HOST:PORT` or `srv://NAME`. Each
    /// site's name and region come from its `/_atoll/health`.
    #[serde(default)]
    pub sites: Vec<String>,
}

/// `[dns]`: how site and peer names are resolved (`http://NAME:PORT`, `srv://NAME`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Resolve names again this often (default 10).
    pub interval_s: Option<u64>,
    /// DNS servers (`IP:PORT`) to ask instead of the system's.
    #[serde(default)]
    pub nameservers: Vec<std::net::SocketAddr>,
}

/// `[sync]`: replication between sites.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Base URLs of peer sites (added to `--peer`).
    #[serde(default)]
    pub peers: Vec<String>,
    /// The URL other sites reach this one at (default: http://<listen address>).
    pub advertise: Option<String>,
    /// Anti-entropy with each peer at least this often (default 5000).
    pub anti_entropy_ms: Option<u64>,
    /// How long a push waits to batch more writes (default 2).
    pub push_delay_ms: Option<u64>,
    /// A site silent for this long is cut off and must resync to rejoin (default 7 days).
    pub horizon_s: Option<u64>,
    /// Tombstone collection interval (default 30).
    pub collect_interval_s: Option<u64>,
    /// `/_atoll/health?ready` waits at most this long for a first sync with a peer (default 60).
    pub ready_timeout_s: Option<u64>,
    /// Remote stamps further than this ahead of this site's clock are not merged, and a site
    /// whose clock is off by more than this from most of its peers refuses guest writes
    /// (default 500, like CockroachDB's `--max-offset`).
    pub max_clock_offset_ms: Option<u64>,
    /// A started site refuses guest writes until a peer confirms its identity, for at most this
    /// long (default 10; a site whose peers are all down then writes anyway).
    pub confirm_timeout_s: Option<u64>,
}

/// `[limits]`: the defaults of every app, which a deploy may override per app.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub deadline_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub max_request_body_bytes: Option<u64>,
    pub max_response_body_bytes: Option<u64>,
}

/// `[runtime]`: the instance pool.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    pub max_instances: Option<u32>,
    /// Threads serving requests, each with its own runtime and socket (default: one per core).
    pub server_threads: Option<usize>,
    pub max_memory_mb: Option<u64>,
    /// Instances one app may hold at once (default: half of max_instances).
    pub max_instances_per_app: Option<u32>,
    /// Request bodies buffered for guests, all apps together (default 512).
    pub max_buffered_body_mb: Option<u64>,
}

/// `[admin]`: the admin API.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub max_upload_bytes: Option<u64>,
    /// The deploy keys (hex, from `atoll keygen`) whose signatures this site trusts.
    #[serde(default)]
    pub deploy_public_keys: Vec<String>,
    /// A deploy key this site signs the uploads its admin token admits with (and trusts).
    pub deploy_key_file: Option<std::path::PathBuf>,
    /// The cluster this site is in (default `atoll`): deploys are signed for one cluster, so a
    /// record signed for staging is refused in production even with one deploy key for both.
    pub cluster: Option<String>,
    /// Whether the status endpoints (`/_atoll/ui/state`, `/_atoll/sync/status`,
    /// `/_atoll/router/status`, `/metrics`) need the admin token too (default false).
    #[serde(default)]
    pub protect_status: bool,
}

/// Sets `a.b.c` in `table` to `raw` read as a TOML value (else a string).
fn set_field(table: &mut toml::Table, field: &str, raw: &str) -> Result<()> {
    let parts: Vec<&str> = field.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("{field:?} is not a field name (expected section.field)");
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let (last, sections) = parts.split_last().context("empty field name")?;
    let mut at = table;
    for (i, section) in sections.iter().enumerate() {
        let entry = at.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = entry
            .as_table_mut()
            .with_context(|| format!("config field {} is not a section", parts[..=i].join(".")))?;
    }
    at.insert(last.to_string(), value);
    Ok(())
}

/// The default cap on an uploaded component.
pub const DEFAULT_MAX_UPLOAD: u64 = 50 << 20;

/// The most connections `[server] max_connections` may allow.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// The most a request or response body buffered for a guest may be (per app setting).
pub const MAX_BODY_BYTES: u64 = 256 << 20;

impl FileConfig {
    /// Reads `path` (or starts from the defaults), then applies every override: environment
    /// variables `ATOLL_SECTION__FIELD=VALUE` (sections and fields joined by `__`, so
    /// `ATOLL_ROUTING__HEALTH__FALL=3` is `routing.health.fall`), then `--set section.field=VALUE`
    /// flags. A VALUE is read as TOML (`5000`, `true`, `["http://a:8080"]`), else as a string.
    /// Unknown fields and invalid values are errors naming the field and where it came from.
    pub fn load_with(
        path: Option<&Path>,
        sets: &[String],
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<FileConfig> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?;
                toml::from_str::<toml::Table>(&text)
                    .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?
            }
            None => toml::Table::new(),
        };
        let mut sources: Vec<String> = path.map(|p| p.display().to_string()).into_iter().collect();
        let mut env: Vec<(String, String)> =
            env.filter(|(k, _)| k.starts_with("ATOLL_") && k.contains("__")).collect();
        env.sort();
        for (key, value) in env {
            let field = key["ATOLL_".len()..].to_ascii_lowercase().replace("__", ".");
            set_field(&mut table, &field, &value).with_context(|| format!("environment variable {key}"))?;
            sources.push(key);
        }
        for set in sets {
            let (field, value) =
                set.split_once('=').with_context(|| format!("--set {set:?}: expected FIELD=VALUE"))?;
            set_field(&mut table, field.trim(), value).with_context(|| format!("--set {set:?}"))?;
            sources.push(format!("--set {field}"));
        }
        let from = if sources.is_empty() { String::new() } else { format!(" ({})", sources.join(", ")) };
        let text = toml::to_string(&table)?;
        let config: FileConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config{from}: {e}"))?;
        config.validate()?;
        config.routing.settings("us-east")?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("limits.deadline_ms", self.limits.deadline_ms),
            ("limits.memory_mb", self.limits.memory_mb),
            ("runtime.max_instances", self.runtime.max_instances.map(u64::from)),
            ("runtime.server_threads", self.runtime.server_threads.map(|n| n as u64)),
            ("runtime.max_memory_mb", self.runtime.max_memory_mb),
            ("admin.max_upload_bytes", self.admin.max_upload_bytes),
            ("sync.anti_entropy_ms", self.sync.anti_entropy_ms),
            ("sync.horizon_s", self.sync.horizon_s),
            ("sync.collect_interval_s", self.sync.collect_interval_s),
            ("sync.max_clock_offset_ms", self.sync.max_clock_offset_ms),
            ("dns.interval_s", self.dns.interval_s),
            ("runtime.max_instances_per_app", self.runtime.max_instances_per_app.map(u64::from)),
            ("runtime.max_buffered_body_mb", self.runtime.max_buffered_body_mb),
            ("server.max_connections", self.server.max_connections.map(|n| n as u64)),
            ("server.header_read_timeout_ms", self.server.header_read_timeout_ms),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
        ];
        if self.server.max_connections.is_some_and(|n| n > MAX_CONNECTIONS) {
            bail!("config field server.max_connections must be at most {MAX_CONNECTIONS}");
        }
        for (field, value) in positive {
            if value == Some(0) {
                bail!("config field {field} must be greater than 0");
            }
        }
        // The site's defaults go through the same bounds as an app's settings.
        let defaults = crate::signing::DeployParams {
            deadline_ms: self.limits.deadline_ms,
            memory_mb: self.limits.memory_mb,
            max_request_body_bytes: self.limits.max_request_body_bytes,
            max_response_body_bytes: self.limits.max_response_body_bytes,
            allow_hosts: None,
            kv_stores: None,
            vars: Default::default(),
            session_cookie: None,
            stale_reads: None,
        };
        defaults
            .settings(&Limits::default(), &self.caps())
            .map_err(|e| anyhow::anyhow!("config section [limits]: {e}"))?;
        self.tls.validate()?;
        crate::signing::validate_cluster(self.cluster())
            .map_err(|e| anyhow::anyhow!("config field admin.cluster: {e}"))?;
        let runtime = self.runtime_config();
        if runtime.max_instances_per_app > runtime.max_instances {
            bail!(
                "config field runtime.max_instances_per_app ({}) must be at most runtime.max_instances ({})",
                runtime.max_instances_per_app,
                runtime.max_instances
            );
        }
        if self.max_upload() > atoll_sync::http::MAX_BLOB as u64 {
            bail!(
                "config field admin.max_upload_bytes must be at most {} (what a peer fetches of a \
                 component: every deployable component must replicate)",
                atoll_sync::http::MAX_BLOB
            );
        }
        Ok(())
    }

    /// What any app may be given at most on this site.
    pub fn caps(&self) -> crate::signing::Caps {
        crate::signing::Caps {
            max_memory_mb: (self.runtime_config().max_memory_bytes >> 20) as u64,
            // A body larger than every guest's bodies together may hold could never be taken.
            max_body_bytes: MAX_BODY_BYTES.min(self.runtime_config().max_buffered_body_bytes as u64),
        }
    }

    /// The per-app limits every app starts from.
    pub fn default_limits(&self) -> Limits {
        let base = Limits::default();
        let l = &self.limits;
        Limits {
            deadline: l.deadline_ms.map(Duration::from_millis).unwrap_or(base.deadline),
            max_memory_bytes: l.memory_mb.map(|mb| (mb << 20) as usize).unwrap_or(base.max_memory_bytes),
            max_request_body: l.max_request_body_bytes.map(|b| b as usize).unwrap_or(base.max_request_body),
            max_response_body: l
                .max_response_body_bytes
                .map(|b| b as usize)
                .unwrap_or(base.max_response_body),
        }
    }

    /// The runtime configuration, before the site adds its identity and cache dir.
    pub fn runtime_config(&self) -> RuntimeConfig {
        let base = RuntimeConfig::default();
        RuntimeConfig {
            max_instances: self.runtime.max_instances.unwrap_or(base.max_instances),
            max_memory_bytes: self
                .runtime
                .max_memory_mb
                .map(|mb| (mb << 20) as usize)
                .unwrap_or(base.max_memory_bytes),
            max_instances_per_app: self.runtime.max_instances_per_app.unwrap_or_else(|| {
                RuntimeConfig::default_per_app(self.runtime.max_instances.unwrap_or(base.max_instances))
            }),
            max_buffered_body_bytes: self
                .runtime
                .max_buffered_body_mb
                .map(|mb| (mb << 20) as usize)
                .unwrap_or(base.max_buffered_body_bytes),
            ..base
        }
    }

    /// What one client connection may cost.
    pub(crate) fn connection_limits(&self) -> crate::listen::ConnectionLimits {
        let base = crate::listen::ConnectionLimits::default();
        let s = &self.server;
        crate::listen::ConnectionLimits {
            max_connections: s.max_connections.unwrap_or(base.max_connections),
            header_read_timeout: s
                .header_read_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(base.header_read_timeout),
            idle_timeout: s.idle_timeout_ms.map(Duration::from_millis).unwrap_or(base.idle_timeout),
        }
    }

    /// How many server threads to run.
    pub fn server_threads(&self) -> usize {
        self.runtime
            .server_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The replication timers.
    pub fn sync_timing(&self) -> atoll_sync::driver::Timing {
        let base = atoll_sync::driver::Timing::default();
        let s = &self.sync;
        atoll_sync::driver::Timing {
            push_delay: s.push_delay_ms.map(Duration::from_millis).unwrap_or(base.push_delay),
            anti_entropy: s.anti_entropy_ms.map(Duration::from_millis).unwrap_or(base.anti_entropy),
            collect: s.collect_interval_s.map(Duration::from_secs).unwrap_or(base.collect),
            ..base
        }
    }

    /// The replication settings of this site's node.
    pub fn node_config(&self) -> atoll_sync::NodeConfig {
        let base = atoll_sync::NodeConfig::default();
        atoll_sync::NodeConfig {
            horizon_ms: self.sync.horizon_s.map(|s| s.saturating_mul(1000)).unwrap_or(base.horizon_ms),
            max_clock_offset_ms: self.sync.max_clock_offset_ms.unwrap_or(base.max_clock_offset_ms),
            confirm_timeout_ms: self
                .sync
                .confirm_timeout_s
                .map(|s| s.saturating_mul(1000))
                .unwrap_or(base.confirm_timeout_ms),
            ..base
        }
    }

    /// The routing settings, `default_region` standing in when `[routing]` names none.
    pub fn routing(&self, default_region: &str) -> Result<atoll_router::Settings> {
        self.routing.settings(default_region)
    }

    /// How long readiness waits for a first sync.
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.sync.ready_timeout_s.unwrap_or(60))
    }

    /// Bound on draining requests in flight at shutdown.
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.shutdown.drain_ms.unwrap_or(10_000))
    }

    /// How long a request waits for replication to cover its session token.
    pub fn session_wait(&self) -> Duration {
        Duration::from_millis(self.consistency.session_wait_ms.unwrap_or(250).min(10_000))
    }

    /// Bound on flushing replication at shutdown.
    pub fn flush(&self) -> Duration {
        Duration::from_millis(self.shutdown.flush_ms.unwrap_or(5_000))
    }

    /// How often names are resolved again.
    pub fn dns_interval(&self) -> Duration {
        Duration::from_secs(self.dns.interval_s.unwrap_or(10))
    }

    /// A discovery over `urls` with this file's DNS settings.
    pub fn discovery(&self, urls: &[String]) -> Result<atoll_router::dns::Discovery> {
        atoll_router::dns::Discovery::new(urls, &self.dns.nameservers, self.dns_interval())
    }

    /// The cluster this site is in.
    pub fn cluster(&self) -> &str {
        self.admin.cluster.as_deref().unwrap_or(crate::signing::DEFAULT_CLUSTER)
    }

    /// The cap on uploads.
    pub fn max_upload(&self) -> u64 {
        self.admin.max_upload_bytes.unwrap_or(DEFAULT_MAX_UPLOAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commented_example_parses_and_shows_the_defaults() {
        let example: FileConfig =
            toml::from_str(include_str!("../../../examples/site.toml")).expect("parses");
        example.validate().expect("valid");
        let defaults = FileConfig::default();
        assert_eq!(example.default_limits(), defaults.default_limits());
        let (a, b) = (example.runtime_config(), defaults.runtime_config());
        assert_eq!((a.max_instances, a.max_memory_bytes), (b.max_instances, b.max_memory_bytes));
        assert_eq!(
            (a.max_instances_per_app, a.max_buffered_body_bytes),
            (b.max_instances_per_app, b.max_buffered_body_bytes)
        );
        assert_eq!(
            format!("{:?}", example.connection_limits()),
            format!("{:?}", defaults.connection_limits())
        );
        assert_eq!(example.max_upload(), defaults.max_upload());
        assert_eq!(format!("{:?}", example.sync_timing()), format!("{:?}", defaults.sync_timing()));
        assert_eq!(example.node_config().horizon_ms, defaults.node_config().horizon_ms);
        let (a, b) =
            (example.routing("eu-west").expect("valid"), defaults.routing("eu-west").expect("valid"));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_eq!(example.dns_interval(), defaults.dns_interval());
        assert!(example.router.sites.is_empty() && example.dns.nameservers.is_empty());
        assert_eq!((example.drain(), example.flush()), (defaults.drain(), defaults.flush()));
        assert_eq!(example.ready_timeout(), defaults.ready_timeout());
    }

    #[test]
    fn unknown_field_is_named() {
        let err = toml::from_str::<FileConfig>("[limits]\ndeadline = 5\n").expect_err("unknown field");
        assert!(err.to_string().contains("deadline"), "{err}");
    }

    #[test]
    fn routing_errors_name_the_field_when_the_file_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[routing.health]\nrise = 0\n").expect("write");
        let err = FileConfig::load_with(Some(&path), &[], std::iter::empty()).expect_err("invalid");
        assert!(format!("{err:#}").contains("routing.health.rise"), "{err:#}");
        std::fs::write(&path, "[dns]\nnameservers = [\"not an address\"]\n").expect("write");
        let err = FileConfig::load_with(Some(&path), &[], std::iter::empty()).expect_err("invalid");
        assert!(format!("{err:#}").contains("nameservers"), "{err:#}");
    }

    #[test]
    fn env_and_flags_override_the_file_and_name_bad_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("site.toml");
        std::fs::write(&path, "[limits]\ndeadline_ms = 100\nmemory_mb = 8\n").expect("write");
        let env = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>().into_iter()
        };
        let config = FileConfig::load_with(
            Some(&path),
            &[
                "limits.memory_mb=16".into(),
                "routing.health.fall=5".into(),
                "sync.peers=[\"http://a:1\"]".into(),
            ],
            env(&[
                ("ATOLL_LIMITS__DEADLINE_MS", "250"),
                ("ATOLL_ADMIN_TOKEN", "not config"),
                ("ATOLL_DNS__INTERVAL_S", "3"),
            ]),
        )
        .expect("valid");
        assert_eq!(config.limits.deadline_ms, Some(250), "env over the file");
        assert_eq!(config.limits.memory_mb, Some(16), "flag over the file");
        assert_eq!(config.routing.health.fall, Some(5));
        assert_eq!(config.sync.peers, ["http://a:1"]);
        assert_eq!(config.dns_interval(), Duration::from_secs(3));
        // Flags win over the environment.
        let config = FileConfig::load_with(
            None,
            &["limits.deadline_ms=7".into()],
            env(&[("ATOLL_LIMITS__DEADLINE_MS", "9")]),
        )
        .expect("valid");
        assert_eq!(config.limits.deadline_ms, Some(7));

        let err = |sets: &[&str], vars: &[(&str, &str)]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            format!("{:#}", FileConfig::load_with(None, &sets, env(vars)).expect_err("invalid"))
        };
        let e = err(&["limits.deadlin_ms=5"], &[]);
        assert!(e.contains("deadlin_ms") && e.contains("--set limits.deadlin_ms"), "{e}");
        let e = err(&[], &[("ATOLL_LIMITS__MEMORY_MB", "lots")]);
        assert!(e.contains("ATOLL_LIMITS__MEMORY_MB") && e.contains("memory_mb"), "{e}");
        let e = err(&["runtime.max_instances=0"], &[]);
        assert!(e.contains("runtime.max_instances"), "{e}");
        let e = err(&["limits=5", "limits.memory_mb=1"], &[]);
        assert!(e.contains("limits is not a section"), "{e}");
        let e = err(&["nonsense"], &[]);
        assert!(e.contains("FIELD=VALUE"), "{e}");
    }

    #[test]
    fn zero_is_invalid_and_named() {
        let config: FileConfig = toml::from_str("[runtime]\nmax_instances = 0\n").expect("parses");
        let err = config.validate().expect_err("zero");
        assert!(err.to_string().contains("runtime.max_instances"), "{err}");
    }

    #[test]
    fn fields_override_defaults() {
        let config: FileConfig =
            toml::from_str("[limits]\ndeadline_ms = 250\nmemory_mb = 8\n").expect("parses");
        let limits = config.default_limits();
        assert_eq!(limits.deadline, Duration::from_millis(250));
        assert_eq!(limits.max_memory_bytes, 8 << 20);
        assert_eq!(limits.max_request_body, Limits::default().max_request_body);
    }
}
