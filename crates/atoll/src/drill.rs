//! `atoll drill`: a failure drill. It runs a mixed client workload through a router (clients in
//! every region, each counting on its own key with `Idempotency-Key` increments and reading it
//! back with its session token) while a scenario of `atoll dev` faults plays, and reports what a
//! user cares about: requests, failures and latency per phase, failover time after a site goes
//! down, replication lag per site, convergence after a heal, and the consistency checks (reads
//! older than the client's own acknowledged writes, flagged or silent; increments run twice).
//!
//! The workload needs an app that counts like the `counter` example: `POST /KEY` increments and
//! answers the total, `GET /KEY` answers it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct DrillArgs {
    /// The router the clients go through.
    #[arg(long)]
    router: String,
    /// How long the workload runs, in seconds (a scenario's last step plus 10 s if longer).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// A scenario: one step a line, `SECONDSs COMMAND` with an `atoll dev` rehearsal command
    /// (`5s kill eu-west-1`, `20s partition ap-south-1`, `30s heal`); `#` starts a comment.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// The data dir of the running `atoll dev` the scenario acts on.
    #[arg(long, default_value = ".atoll/dev")]
    data: PathBuf,
    /// The app the clients use (it must count: POST /KEY increments, GET /KEY reads).
    #[arg(long, default_value = "counter")]
    app: String,
    /// Clients per region.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl DrillArgs {
    /// The drill `atoll dev --scenario` runs on its own cluster: as long as the scenario and
    /// 10 s more.
    pub fn for_dev(router: String, scenario: PathBuf, data: PathBuf, app: String) -> DrillArgs {
        DrillArgs { router, duration: 0, scenario: Some(scenario), data, app, clients: 2, json: false }
    }
}

/// One scripted step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub at_s: f64,
    pub command: Vec<String>,
}

/// Reads a scenario file.
pub fn parse_scenario(text: &str) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let at = words.next().unwrap_or("");
        let at_s: f64 = at
            .strip_suffix('s')
            .and_then(|s| s.parse().ok())
            .filter(|s: &f64| s.is_finite() && *s >= 0.0)
            .with_context(|| format!("scenario line {}: {at:?} is not a time such as 5s", n + 1))?;
        let command: Vec<String> = words.map(str::to_owned).collect();
        let known = ["kill", "stop", "start", "partition", "heal", "latency", "skew"];
        if command.first().is_none_or(|c| !known.contains(&c.as_str())) {
            bail!("scenario line {}: expected one of {} after the time", n + 1, known.join(", "));
        }
        if steps.last().is_some_and(|s: &Step| s.at_s > at_s) {
            bail!("scenario line {}: steps must be in time order", n + 1);
        }
        steps.push(Step { at_s, command });
    }
    Ok(steps)
}

/// One request the workload made.
#[derive(Debug, Clone)]
struct Sample {
    at_ms: u64,
    latency_ms: f64,
    ok: bool,
    region: String,
    site: String,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Consistency {
    pub reads: u64,
    /// Reads older than the client's own acknowledged writes, flagged `x-atoll-stale: 1`.
    pub stale_flagged: u64,
    /// Reads older than the client's own acknowledged writes, not flagged: broken promises.
    pub stale_silent: u64,
    pub increments_acknowledged: u64,
    /// Increments whose outcome the sites could not tell (409 for a key whose first attempt
    /// ran at a site that died in it).
    pub increments_unknown: u64,
    /// Increments a site refused to run because the client's session had seen writes it lacks
    /// (409 before the handler: they did not run).
    pub increments_refused: u64,
    pub increments_failed: u64,
    /// Counted more times than acknowledged and unknown together allow.
    pub duplicates: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub from_s: f64,
    pub to_s: f64,
    pub event: String,
    pub requests: usize,
    pub failures: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub phases: Vec<Phase>,
    /// After each kill or stop: the region the site served, and how long until another site
    /// answered it.
    pub failovers: Vec<(String, String, Option<f64>)>,
    /// After each heal or start: how long until every site held the same counts.
    pub convergence_s: Vec<(String, Option<f64>)>,
    /// The greatest replication lag each site measured from its peers during the drill (ms).
    pub max_lag_ms: BTreeMap<String, u64>,
    pub consistency: Consistency,
    /// Per client key: increments acknowledged, and increments whose outcome is unknown.
    pub keys: BTreeMap<String, (u64, u64)>,
}

struct Shared {
    start: Instant,
    samples: Mutex<Vec<Sample>>,
    consistency: Mutex<Consistency>,
    stop: AtomicBool,
    /// Per client key, its acknowledged and unknown increments.
    keys: Mutex<BTreeMap<String, (u64, u64)>>,
}

impl Shared {
    /// Counts an increment of `key`: acknowledged, or of unknown outcome.
    fn tally(&self, key: &str, acknowledged: bool) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let (acked, unknown) = keys.entry(key.to_owned()).or_default();
        if acknowledged {
            *acked += 1;
        } else {
            *unknown += 1;
        }
    }
}

fn new_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// What one response said.
struct Answer {
    status: u16,
    body: String,
    site: String,
    token: Option<String>,
    stale: bool,
}

fn send(agent: &ureq::Agent, method: &str, url: &str, headers: &[(&str, &str)]) -> Option<Answer> {
    let result = if method == "POST" {
        let mut r = agent.post(url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send_empty()
    } else {
        let mut r = agent.get(url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.call()
    };
    let mut response = result.ok()?;
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (status, site, token, stale) = (
        response.status().as_u16(),
        header("x-atoll-site").unwrap_or_default(),
        header("x-atoll-session"),
        header("x-atoll-stale").as_deref() == Some("1"),
    );
    let body = response.body_mut().read_to_string().unwrap_or_default();
    Some(Answer { status, body, site, token, stale })
}

/// One client: its own key, increments with a key per operation (retried with the same key),
/// reads with its session token.
fn client(shared: Arc<Shared>, router: String, app: String, region: String, id: String) {
    let agent = new_agent();
    let key = format!("drill-{id}");
    let url = format!("{router}/apps/{app}/{key}");
    let mut token: Option<String> = None;
    let mut acked = 0u64;
    let mut op = 0u64;
    let run = fastrand::u64(..);
    while !shared.stop.load(Ordering::Relaxed) {
        op += 1;
        let write = fastrand::u8(..10) < 3;
        let idem = format!("{run:x}-{id}-{op}");
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut headers = vec![("x-atoll-region", region.as_str())];
            if write {
                headers.push(("idempotency-key", idem.as_str()));
            }
            if let Some(t) = &token {
                headers.push(("x-atoll-session", t.as_str()));
            }
            let started = Instant::now();
            let answer = send(&agent, if write { "POST" } else { "GET" }, &url, &headers);
            let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            let ok = answer.as_ref().is_some_and(|a| a.status == 200);
            shared.samples.lock().unwrap_or_else(|e| e.into_inner()).push(Sample {
                at_ms: shared.start.elapsed().as_millis() as u64,
                latency_ms,
                ok,
                region: region.clone(),
                site: answer.as_ref().map(|a| a.site.clone()).unwrap_or_default(),
            });
            if let Some(t) = answer.as_ref().and_then(|a| a.token.clone()) {
                token = Some(t);
            }
            let mut c = shared.consistency.lock().unwrap_or_else(|e| e.into_inner());
            match (&answer, write) {
                (Some(a), true) if a.status == 200 => {
                    acked += 1;
                    c.increments_acknowledged += 1;
                    shared.tally(&key, true);
                    break;
                }
                (Some(a), true) if a.status == 409 && a.body.contains("so it is not run here") => {
                    c.increments_refused += 1;
                    break;
                }
                (Some(a), true) if a.status == 409 => {
                    c.increments_unknown += 1;
                    shared.tally(&key, false);
                    break;
                }
                (Some(a), false) if a.status == 200 => {
                    c.reads += 1;
                    let seen: u64 = a.body.trim().parse().unwrap_or(0);
                    if seen < acked {
                        if a.stale {
                            c.stale_flagged += 1;
                        } else {
                            c.stale_silent += 1;
                        }
                    }
                    break;
                }
                _ if attempts < 4 && !shared.stop.load(Ordering::Relaxed) => {
                    // A failure: the same request again (a write with the same key).
                    drop(c);
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    if write {
                        c.increments_failed += 1;
                        // Whether it ran is not known: it counts as unknown for duplicates.
                        shared.tally(&key, false);
                    }
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The sites behind the router: (name, url, region).
fn sites(agent: &ureq::Agent, router: &str) -> Result<Vec<(String, String, String)>> {
    let mut response = agent
        .get(format!("{router}/_atoll/router/status"))
        .call()
        .with_context(|| format!("cannot reach the router at {router}"))?;
    let status: serde_json::Value = serde_json::from_str(&response.body_mut().read_to_string()?)
        .context("the router's status is not JSON")?;
    let sites: Vec<(String, String, String)> = status["sites"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|s| {
                    Some((
                        s["name"].as_str()?.to_owned(),
                        s["url"].as_str()?.to_owned(),
                        s["region"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if sites.is_empty() {
        bail!("the router at {router} knows no sites");
    }
    Ok(sites)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs the drill and returns its report.
pub fn drill(args: &DrillArgs) -> Result<Report> {
    let agent = new_agent();
    let router = args.router.trim_end_matches('/').to_owned();
    let steps = match &args.scenario {
        Some(path) => parse_scenario(
            &std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        )?,
        None => vec![],
    };
    let sites = sites(&agent, &router)?;
    let mut regions: Vec<String> = sites.iter().map(|s| s.2.clone()).collect();
    regions.sort();
    regions.dedup();
    let duration = Duration::from_secs(args.duration)
        .max(Duration::from_secs_f64(steps.last().map_or(0.0, |s| s.at_s + 10.0)));
    let shared = Arc::new(Shared {
        start: Instant::now(),
        samples: Mutex::new(Vec::new()),
        consistency: Mutex::new(Consistency::default()),
        stop: AtomicBool::new(false),
        keys: Mutex::new(BTreeMap::new()),
    });
    let mut threads = Vec::new();
    for region in &regions {
        for c in 0..args.clients.max(1) {
            let (shared, router, app, region) =
                (shared.clone(), router.clone(), args.app.clone(), region.clone());
            let id = format!("{region}-{c}");
            threads.push(std::thread::spawn(move || client(shared, router, app, region, id)));
        }
    }
    // Replication lag, sampled.
    let lags = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let sampler = {
        let (shared, lags, sites) = (shared.clone(), lags.clone(), sites.clone());
        std::thread::spawn(move || {
            let agent = new_agent();
            while !shared.stop.load(Ordering::Relaxed) {
                for (name, url, _) in &sites {
                    let lag = agent
                        .get(format!("{url}/_atoll/sync/status"))
                        .call()
                        .ok()
                        .and_then(|mut r| r.body_mut().read_to_string().ok())
                        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                        .and_then(|v| {
                            v["peers"].as_array().map(|p| p.iter().filter_map(|p| p["lag_ms"].as_u64()).max())
                        })
                        .flatten();
                    if let Some(lag) = lag {
                        let mut lags = lags.lock().unwrap_or_else(|e| e.into_inner());
                        let max = lags.entry(name.clone()).or_default();
                        *max = (*max).max(lag);
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    // The scenario.
    let mut events: Vec<(f64, String)> = Vec::new();
    let mut convergence = Vec::new();
    for step in &steps {
        let at = Duration::from_secs_f64(step.at_s);
        if let Some(wait) = at.checked_sub(shared.start.elapsed()) {
            std::thread::sleep(wait);
        }
        let at_s = shared.start.elapsed().as_secs_f64();
        rehearse(&args.data, &step.command)?;
        let label = step.command.join(" ");
        events.push((at_s, label.clone()));
        if matches!(step.command[0].as_str(), "heal" | "start") {
            convergence.push((label, caught_up(&agent, &sites, &args.app, &shared, Duration::from_secs(20))));
        }
    }
    if let Some(wait) = duration.checked_sub(shared.start.elapsed()) {
        std::thread::sleep(wait);
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let _ = sampler.join();
    let end_s = shared.start.elapsed().as_secs_f64();

    // Final counts, once every site agrees (or 60 s): increments counted more often than they
    // were acknowledged (or left unknown) are duplicates.
    let mut consistency = shared.consistency.lock().unwrap_or_else(|e| e.into_inner()).clone();
    converge(&agent, &sites, &args.app, &shared, Duration::from_secs(60));
    let keys = shared.keys.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let counts = counts(&agent, &sites, &args.app, &keys.keys().cloned().collect::<Vec<_>>());
    for (key, (acked, unknown)) in &keys {
        let final_count = counts.iter().filter_map(|site| site.get(key)).copied().max().unwrap_or(0);
        consistency.duplicates += final_count.saturating_sub(acked + unknown);
    }

    let samples = shared.samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut bounds: Vec<(f64, String)> = vec![(0.0, "(start)".into())];
    bounds.extend(events.iter().cloned());
    let mut phases = Vec::new();
    for (i, (from, event)) in bounds.iter().enumerate() {
        let to = bounds.get(i + 1).map_or(end_s, |b| b.0);
        let inside: Vec<&Sample> = samples
            .iter()
            .filter(|s| (s.at_ms as f64) / 1000.0 >= *from && (s.at_ms as f64) / 1000.0 < to)
            .collect();
        let mut latencies: Vec<f64> = inside.iter().map(|s| s.latency_ms).collect();
        latencies.sort_by(|a, b| a.total_cmp(b));
        phases.push(Phase {
            from_s: *from,
            to_s: to,
            event: event.clone(),
            requests: inside.len(),
            failures: inside.iter().filter(|s| !s.ok).count(),
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
            max_ms: latencies.last().copied().unwrap_or(0.0),
        });
    }
    // Failover: for a site that went down, the regions it served (its answers before), and the
    // first answer there from another site after the event.
    let mut failovers = Vec::new();
    for (at_s, event) in &events {
        let words: Vec<&str> = event.split_whitespace().collect();
        if !matches!(words.first(), Some(&"kill") | Some(&"stop")) {
            continue;
        }
        let Some(site) = words.get(1) else { continue };
        let at_ms = (*at_s * 1000.0) as u64;
        let mut served: Vec<&String> =
            samples.iter().filter(|s| s.at_ms < at_ms && s.site == *site).map(|s| &s.region).collect();
        served.sort();
        served.dedup();
        for region in served {
            let first = samples
                .iter()
                .filter(|s| s.at_ms >= at_ms && s.region == *region && s.ok && s.site != *site)
                .map(|s| (s.at_ms as f64 + s.latency_ms) / 1000.0 - at_s)
                .next();
            failovers.push((event.clone(), region.clone(), first));
        }
    }
    let max_lag_ms = lags.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Report { phases, failovers, convergence_s: convergence, max_lag_ms, consistency, keys })
}

/// An `atoll dev` rehearsal command against the cluster in `data`.
fn rehearse(data: &Path, command: &[String]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the atoll binary")?;
    let out = std::process::Command::new(exe)
        .arg("dev")
        .args(command)
        .arg("--data")
        .arg(data)
        .output()
        .context("cannot run atoll dev")?;
    if !out.status.success() {
        bail!("scenario step `{}`: {}", command.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Every client key's count at every site that answers (read there, not forwarded).
fn counts(
    agent: &ureq::Agent,
    sites: &[(String, String, String)],
    app: &str,
    keys: &[String],
) -> Vec<BTreeMap<String, u64>> {
    sites
        .iter()
        .filter_map(|(_, url, region)| {
            let mut site = BTreeMap::new();
            for key in keys {
                let mut r = agent
                    .get(format!("{url}/apps/{app}/{key}"))
                    .header("x-atoll-region", region.as_str())
                    .call()
                    .ok()?;
                if r.status() != 200 {
                    return None;
                }
                site.insert(key.clone(), r.body_mut().read_to_string().ok()?.trim().parse().ok()?);
            }
            Some(site)
        })
        .collect()
}

/// Seconds until every site holds every increment acknowledged so far (the workload goes on,
/// so equal counts would be a moving target; `None`: not within `limit`).
fn caught_up(
    agent: &ureq::Agent,
    sites: &[(String, String, String)],
    app: &str,
    shared: &Shared,
    limit: Duration,
) -> Option<f64> {
    let acked: BTreeMap<String, u64> = shared
        .keys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, (a, _))| (k.clone(), *a))
        .collect();
    let keys: Vec<String> = acked.keys().cloned().collect();
    until_counts(
        agent,
        sites,
        app,
        || keys.clone(),
        limit,
        |all| all.iter().all(|site| acked.iter().all(|(k, a)| site.get(k).is_some_and(|n| n >= a))),
    )
}

/// Seconds until every site answering holds the same counts (`None`: not within `limit`).
fn converge(
    agent: &ureq::Agent,
    sites: &[(String, String, String)],
    app: &str,
    shared: &Shared,
    limit: Duration,
) -> Option<f64> {
    let keys = || shared.keys.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
    until_counts(agent, sites, app, keys, limit, |all| all.windows(2).all(|w| w[0] == w[1]))
}

/// Seconds until every site answers `keys()`'s counts and `done` holds for them (`None`: not
/// within `limit`).
fn until_counts(
    agent: &ureq::Agent,
    sites: &[(String, String, String)],
    app: &str,
    keys: impl Fn() -> Vec<String>,
    limit: Duration,
    done: impl Fn(&[BTreeMap<String, u64>]) -> bool,
) -> Option<f64> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let all = counts(agent, sites, app, &keys());
        if all.len() == sites.len() && done(&all) {
            return Some(started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// `atoll drill`.
pub fn run(args: DrillArgs) -> Result<()> {
    let report = drill(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(())
}

/// The report as text.
pub fn print(report: &Report) {
    println!(
        "{:<24} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "phase (from)", "from s", "requests", "failures", "p50 ms", "p99 ms", "max ms"
    );
    for p in &report.phases {
        println!(
            "{:<24} {:>8.1} {:>8} {:>9} {:>9.1} {:>9.1} {:>9.1}",
            p.event, p.from_s, p.requests, p.failures, p.p50_ms, p.p99_ms, p.max_ms
        );
    }
    for (event, region, after) in &report.failovers {
        match after {
            Some(s) => println!("failover after `{event}`: {region} answered by another site after {s:.2} s"),
            None => println!("failover after `{event}`: {region} was not answered by another site"),
        }
    }
    for (event, after) in &report.convergence_s {
        match after {
            Some(s) => println!(
                "convergence after `{event}`: every site holds every acknowledged write after {s:.2} s"
            ),
            None => println!("convergence after `{event}`: not within 20 s"),
        }
    }
    let lags: Vec<String> = report.max_lag_ms.iter().map(|(s, l)| format!("{s} {l} ms")).collect();
    println!("replication lag (greatest seen): {}", lags.join(", "));
    let c = &report.consistency;
    println!(
        "consistency: {} reads, {} stale and flagged, {} stale and NOT flagged; {} increments acknowledged, \
         {} unknown (409), {} refused (session behind), {} failed, {} counted twice",
        c.reads,
        c.stale_flagged,
        c.stale_silent,
        c.increments_acknowledged,
        c.increments_unknown,
        c.increments_refused,
        c.increments_failed,
        c.duplicates
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_is_read_and_a_bad_one_says_where() {
        let steps = parse_scenario(
            "# a drill\n5s kill eu-west-1\n\n12.5s partition ap-south-1 --from us-east-1\n20s heal # end\n",
        )
        .expect("valid");
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[1].at_s, 12.5);
        assert_eq!(steps[1].command, ["partition", "ap-south-1", "--from", "us-east-1"]);
        for (bad, says) in [
            ("five kill a", "line 1"),
            ("5s explode a", "expected one of"),
            ("9s heal\n5s heal", "time order"),
        ] {
            let e = parse_scenario(bad).expect_err(bad);
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
    }
}
