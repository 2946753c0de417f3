//! Routing settings, as they appear in the TOML files of `atoll site` (`[routing]`) and
//! `atoll router` (the same section, plus its sites). Every field is optional; unknown fields
//! are errors naming the field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::regions::{Coord, Regions};

/// The header a client's region comes in by default.
pub const REGION_HEADER: &str = "x-atoll-region";

/// `[routing]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// The request header naming the client's region (default `x-atoll-region`).
    pub region_header: Option<String>,
    /// The region assumed when the header is missing or names no known region (a router's
    /// default: `us-east`; a site's default: its own region).
    pub default_region: Option<String>,
    /// Attempts per request across sites (default 3).
    pub max_attempts: Option<u32>,
    /// How long to wait for a site's response head before giving up on it (default 30 000).
    pub response_timeout_ms: Option<u64>,
    /// Whether a safe request (GET, HEAD, OPTIONS, TRACE) slow to be answered, or whose site leaves
    /// the rotation, is also sent to the next live site (default true).
    pub hedging: Option<bool>,
    /// Idempotent requests with a body up to this size are buffered so they can be retried at
    /// another site after being sent (default 65 536). Larger bodies stream and are not retried
    /// once sent.
    pub replay_body_bytes: Option<u64>,
    /// Addresses (`10.0.0.7`) and networks (`10.244.0.0/16`) whose `x-atoll-forwarded-by` and
    /// `x-forwarded-for` are believed: other Atoll routers in front of this one. Besides these,
    /// a site believes the sites it routes to. Default: loopback only. From anyone else both
    /// headers are replaced: `x-forwarded-for` becomes the connection's peer address.
    pub trusted_forwarders: Option<Vec<String>>,
    /// How requests reach other sites: `http2` (default: one connection per site and server
    /// thread, requests multiplexed on it; h2c for `http://` sites, ALPN for `https://`) or
    /// `http1` (a pooled connection per request in flight). `http2` costs a forwarded request
    /// about a third less CPU at the router and the site; a site's connection allows 1,000
    /// requests at once (past that, requests from one router thread to that site wait for one
    /// to end), and a connection that fails takes all its requests with it.
    pub site_protocol: Option<String>,
    /// `[routing.health]`.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[routing.regions.NAME] lat = …, lon = …`: extra or overridden regions.
    #[serde(default)]
    pub regions: BTreeMap<String, Coord>,
    /// `[routing.latency.FROM] TO = ms`: an explicit latency table, used instead of distance for
    /// the pairs it lists.
    #[serde(default)]
    pub latency: BTreeMap<String, BTreeMap<String, f64>>,
}

/// `[routing.health]`: active health checks of every other site's `/_atoll/health`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between checks of one site (default 200).
    pub interval_ms: Option<u64>,
    /// A check not answered within this fails (default 250).
    pub timeout_ms: Option<u64>,
    /// Consecutive failed checks that take a live site out of rotation (default 2). A refused
    /// or reset connection while proxying takes it out at once.
    pub fall: Option<u32>,
    /// Consecutive passed checks that put a dead site back (default 2).
    pub rise: Option<u32>,
}

/// The settings with defaults filled in.
#[derive(Debug, Clone)]
pub struct Settings {
    pub region_header: http::HeaderName,
    pub default_region: String,
    pub max_attempts: u32,
    pub response_timeout: Duration,
    pub hedging: bool,
    pub replay_body_bytes: u64,
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
    pub regions: Regions,
    pub trusted_forwarders: Vec<ipnet::IpNet>,
    /// Requests reach other sites over HTTP/2 (`routing.site_protocol`, the default).
    pub http2: bool,
}

impl RoutingConfig {
    /// Checks the values and fills in the defaults; `default_region` is used when the file
    /// names none. Errors name the field.
    pub fn settings(&self, default_region: &str) -> anyhow::Result<Settings> {
        let positive = [
            ("routing.max_attempts", self.max_attempts.map(u64::from)),
            ("routing.response_timeout_ms", self.response_timeout_ms),
            ("routing.health.interval_ms", self.health.interval_ms),
            ("routing.health.timeout_ms", self.health.timeout_ms),
            ("routing.health.fall", self.health.fall.map(u64::from)),
            ("routing.health.rise", self.health.rise.map(u64::from)),
        ];
        for (field, value) in positive {
            if value == Some(0) {
                anyhow::bail!("config field {field} must be greater than 0");
            }
        }
        let header = self.region_header.as_deref().unwrap_or(REGION_HEADER);
        let region_header = http::HeaderName::try_from(header).map_err(|_| {
            anyhow::anyhow!("config field routing.region_header: {header:?} is not a header name")
        })?;
        let mut regions = Regions::builtin();
        for (name, coord) in &self.regions {
            if !(-90.0..=90.0).contains(&coord.lat) || !(-180.0..=180.0).contains(&coord.lon) {
                anyhow::bail!(
                    "config field routing.regions.{name}: lat must be in -90..=90 and lon in -180..=180"
                );
            }
            regions.set(name, *coord);
        }
        for (from, row) in &self.latency {
            for (to, ms) in row {
                if !ms.is_finite() || *ms < 0.0 {
                    anyhow::bail!("config field routing.latency.{from}.{to} must be a non-negative number");
                }
                regions.set_latency(from, to, *ms);
            }
        }
        let default_region = self.default_region.as_deref().unwrap_or(default_region);
        let default_region = regions.resolve(default_region).ok_or_else(|| {
            anyhow::anyhow!(
                "config field routing.default_region: {default_region:?} is not a known region (add it \
                 under [routing.regions])"
            )
        })?;
        let trusted = match &self.trusted_forwarders {
            Some(list) => list.clone(),
            None => vec!["127.0.0.0/8".into(), "::1".into()],
        };
        let trusted_forwarders = trusted
            .iter()
            .map(|text| {
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "config field routing.trusted_forwarders: {text:?} is not an address or a network \
                             (10.0.0.7, 10.244.0.0/16)"
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let http2 = match self.site_protocol.as_deref() {
            None | Some("http2") => true,
            Some("http1") => false,
            Some(other) => {
                anyhow::bail!(
                    "config field routing.site_protocol: {other:?} is neither \"http1\" nor \"http2\""
                )
            }
        };
        Ok(Settings {
            http2,
            trusted_forwarders,
            region_header,
            default_region,
            max_attempts: self.max_attempts.unwrap_or(3),
            response_timeout: Duration::from_millis(self.response_timeout_ms.unwrap_or(30_000)),
            hedging: self.hedging.unwrap_or(true),
            replay_body_bytes: self.replay_body_bytes.unwrap_or(64 << 10),
            interval: Duration::from_millis(self.health.interval_ms.unwrap_or(200)),
            timeout: Duration::from_millis(self.health.timeout_ms.unwrap_or(250)),
            fall: self.health.fall.unwrap_or(2),
            rise: self.health.rise.unwrap_or(2),
            regions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let s = RoutingConfig::default().settings("us-east").expect("valid");
        assert_eq!(s.region_header, "x-atoll-region");
        assert_eq!(s.default_region, "us-east");
        assert_eq!(
            (s.fall, s.rise, s.interval, s.timeout),
            (2, 2, Duration::from_millis(200), Duration::from_millis(250))
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = |text: &str| {
            let config: RoutingConfig = toml::from_str(text).expect("parses");
            config.settings("us-east").expect_err("invalid").to_string()
        };
        assert!(err("[health]\nfall = 0\n").contains("routing.health.fall"));
        assert!(err("default_region = \"mars\"\n").contains("routing.default_region"));
        assert!(err("[regions.x]\nlat = 100.0\nlon = 0.0\n").contains("routing.regions.x"));
        assert!(err("[latency.a]\nb = -1.0\n").contains("routing.latency.a.b"));
        assert!(err("region_header = \"bad header\"\n").contains("routing.region_header"));
        assert!(err("site_protocol = \"h3\"\n").contains("routing.site_protocol"));
        let unknown = toml::from_str::<RoutingConfig>("[health]\nintervall_ms = 5\n").expect_err("unknown");
        assert!(unknown.to_string().contains("intervall_ms"), "{unknown}");
    }

    #[test]
    fn configured_regions_and_latency() {
        let config: RoutingConfig = toml::from_str(
            "default_region = \"lab\"\n[regions.lab]\nlat = 52.5\nlon = 13.4\n[latency.lab]\nap-south = 5.0\n",
        )
        .expect("parses");
        let s = config.settings("us-east").expect("valid");
        assert_eq!(s.default_region, "lab");
        assert_eq!(s.regions.distance("lab", "ap-south"), Some(5.0));
    }
}
