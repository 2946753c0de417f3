//! `cargo xtask`: the project's tasks.
//!
//! - `build-guests`: build `guests/` for wasm32-wasip2 (installing the target if missing).
//! - `demo`: build, then `atoll dev` with the example handlers deployed (three replicating sites
//!   and a router); Ctrl-C stops them.
//! - `bench`: load `hello` through a release site and a native axum route in the same run, and
//!   print requests/s, p50/p99 latency, server CPU per request and the ratio.
//! - `bench-kv`: durable key-value writes and reads through the counter guest.
//! - `bench-sync`: push-path replication latency between two release sites.
//! - `bench-router`: router overhead (p50/p99 added latency) and failover time over repeated kills.
//! - `sim`: the replication simulation over many seeds.
//! - `sim-mutants`: breaks each replication safeguard in turn (a small source edit, undone after)
//!   and checks that the simulation catches it.
//! - `chaos`: the end-to-end chaos test (real sites SIGKILLed under load) for minutes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the guests/ workspace for wasm32-wasip2.
    BuildGuests,
    /// `atoll dev` (three local sites and a router) with the example handlers deployed.
    Demo {
        /// Where the router listens (the sites take the next ports).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Throughput of hello through a site versus a native axum route, in the same run.
    Bench {
        /// Seconds of load per target.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Rounds over all targets, taking turns (default: 1, or 3 with a baseline or --all).
        #[arg(long)]
        rounds: Option<usize>,
        /// Every ratio in one table: site/native, site/minimal host, router/direct, the store's
        /// creates and overwrites, key-value writes through guests, memory with 100 apps.
        #[arg(long)]
        all: bool,
        /// With --all: a git revision (built in a worktree of its own) or an `atoll` binary,
        /// measured beside this tree in the same run.
        #[arg(long, requires = "all")]
        baseline: Option<String>,
    },
    /// Durable key-value writes and reads through the counter guest on a release site.
    BenchKv {
        /// Seconds of load per case.
        #[arg(long, default_value_t = 5)]
        duration: u64,
    },
    /// Replication latency: a write acknowledged at site A until it is readable at site B.
    BenchSync {
        /// Writes measured.
        #[arg(long, default_value_t = 1000)]
        writes: usize,
        /// Also measure with TLS between the sites.
        #[arg(long)]
        tls: bool,
    },
    /// Resident memory of a release site: idle, with N distinct small apps, and serving them.
    BenchMemory {
        /// Distinct apps deployed (`hello`, each with its own custom section: compiled apart).
        #[arg(long, default_value_t = 100)]
        apps: usize,
    },
    /// Router overhead versus calling the site directly, and failover time over repeated kills.
    BenchRouter {
        /// Requests timed per path and target.
        #[arg(long, default_value_t = 5000)]
        requests: usize,
        /// Times the nearest site is SIGKILLed.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Also measure a router reaching a site over TLS.
        #[arg(long)]
        tls: bool,
    },
    /// The deterministic replication simulation over many seeds (release build).
    Sim {
        /// Seeds 0..N.
        #[arg(long, default_value_t = 10_000)]
        seeds: u64,
    },
    /// Breaks each replication safeguard in turn and checks that a test of the store or of
    /// replication (the simulation, or the rule's own test) fails.
    SimMutants {
        /// Seeds 0..N per mutant.
        #[arg(long, default_value_t = 2_000)]
        seeds: u64,
    },
    /// The chaos test: three real sites, clients at random sites, a site SIGKILLed and restarted
    /// every few seconds; then every site must hold the same state and nothing acknowledged lost.
    Chaos {
        /// How long the kills go on, in seconds.
        #[arg(long, default_value_t = 300)]
        secs: u64,
        /// The seed of the clients' and the kills' choices.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildGuests => build_guests().map(drop),
        Task::Demo { listen } => demo(&listen),
        Task::Bench { duration, connections, rounds, all: false, .. } => bench(duration, connections, rounds),
        Task::Bench { duration, rounds, all: true, baseline, .. } => {
            bench_all(duration, rounds.unwrap_or(3), baseline.as_deref())
        }
        Task::BenchKv { duration } => bench_kv(duration),
        Task::BenchSync { writes, tls } => bench_sync(writes, tls),
        Task::BenchRouter { requests, kills, tls } => bench_router(requests, kills, tls),
        Task::BenchMemory { apps } => bench_memory(apps),
        Task::Sim { seeds } => run(Command::new("cargo")
            .current_dir(root())
            .args(["test", "--release", "-p", "atoll-sync", "--test", "sim", "--", "--nocapture"])
            .env("ATOLL_SIM_SEEDS", seeds.to_string())),
        Task::SimMutants { seeds } => sim_mutants(seeds),
        Task::Chaos { secs, seed } => run(Command::new("cargo")
            .current_dir(root())
            .args(["test", "-p", "atoll", "--test", "e2e", "faults::chaos", "--", "--nocapture"])
            .env("ATOLL_CHAOS_SECS", secs.to_string())
            .env("ATOLL_CHAOS_SEED", seed.to_string())),
    }
}

/// A safeguard broken on purpose: in `file`, `from` becomes `to`; the simulation must fail.
struct Mutant {
    what: &'static str,
    file: &'static str,
    from: &'static str,
    to: &'static str,
}

const MUTANTS: &[Mutant] = &[
    Mutant {
        what: "tombstones already collected are stored again (no floor)",
        file: "crates/kv/src/store/writer.rs",
        from: "&& remote.changed.hlc < floor\n",
        to: "&& remote.changed.hlc < floor && false\n",
    },
    Mutant {
        what: "writer ids ignore the incarnation (a restored site reuses its stamps and counters)",
        file: "crates/kv/src/identity.rs",
        from: "self.incarnation as u32 ^ self.writer_epoch",
        to: "self.writer_epoch",
    },
    Mutant {
        what: "an older copy of a data dir is never recognised",
        file: "crates/sync/src/membership.rs",
        from: "    if restored {",
        to: "    if false && restored {",
    },
    Mutant {
        what: "a later boot is judged by its own clock at open only (no lineage)",
        file: "crates/sync/src/membership.rs",
        from: "|| (hello.boot > r.boot && !follows(hello, r));",
        to: "|| (hello.boot > r.boot && hello.opened_at < r.durable);",
    },
    Mutant {
        what: "a hello held up past its sender's restart is taken for an older copy (a needless resync)",
        file: "crates/sync/src/membership.rs",
        from: "if hello.boot < r.boot && delayed(hello, r) {",
        to: "if false {",
    },
    Mutant {
        what: "acknowledgements count at once (no maturity)",
        file: "crates/sync/src/node/collect.rs",
        from: "m.mature(now_ms, maturity);",
        to: "m.mature(now_ms, 0);",
    },
    Mutant {
        what: "a resyncing site's pushes are merged (no quarantine on the push path)",
        file: "crates/sync/src/node/answer.rs",
        from: "if from.resyncing {",
        to: "if false && from.resyncing {",
    },
    Mutant {
        what: "a resyncing site's rounds are merged (no quarantine on the anti-entropy path)",
        file: "crates/sync/src/node/answer.rs",
        from: "take: !from.resyncing,",
        to: "take: true,",
    },
    Mutant {
        what: "any peer vouches for a resync (a new site, or one resyncing itself)",
        file: "crates/sync/src/node/session.rs",
        from: "vouches = take && !m.resyncing && (before(m) || nobody_before);",
        to: "vouches = true;",
    },
    Mutant {
        what: "a message sent before a resync is merged after it (no since check)",
        file: "crates/sync/src/membership.rs",
        from: "if from.since < self.record.since {",
        to: "if false && from.since < self.record.since {",
    },
    Mutant {
        what: "a resync keeps the writer id (increments after it fall into a slot peers hold higher)",
        file: "crates/kv/src/store/horizon.rs",
        from: "identity.writer_epoch = identity.writer_epoch.wrapping_add(1);",
        to: "",
    },
    Mutant {
        what: "increments a resync set aside are never put back",
        file: "crates/kv/src/store/writer.rs",
        from: "if merged.stamp < saved.stamp {",
        to: "if true {",
    },
    Mutant {
        what: "any session ends a resync (none under way, or one begun during the session)",
        file: "crates/sync/src/node/session.rs",
        from: "let finished = began.is_some() && same_epoch && vouches;",
        to: "let finished = vouches;",
    },
    Mutant {
        what: "a site cut off past the horizon is told it was counted (its counters are put back)",
        file: "crates/sync/src/membership.rs",
        from: "let uncounted = collected == Hlc::ZERO || self.counted_at != wire(collected);",
        to: "let uncounted = false;",
    },
    Mutant {
        what: "a guest's write is committed on a store the gate has closed since",
        file: "crates/kv/src/store/writer.rs",
        from: "if job.guest\n",
        to: "if false && job.guest\n",
    },
    Mutant {
        what: "a site told to resync keeps its old data (no discard)",
        file: "crates/kv/src/store/horizon.rs",
        from: "if entry.stamp.hlc < before {",
        to: "if entry.stamp.hlc < before && false {",
    },
];

/// Restores a mutated file however the run ends.
struct Restore {
    path: PathBuf,
    original: String,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.original) {
            eprintln!("cannot restore {}: {e}", self.path.display());
        }
    }
}

fn sim_mutants(seeds: u64) -> Result<()> {
    let mut missed = Vec::new();
    let mut report = Vec::new();
    for m in MUTANTS {
        let path = root().join(m.file);
        let original = std::fs::read_to_string(&path)?;
        if original.matches(m.from).count() != 1 {
            bail!("mutant \"{}\": {} does not hold its text exactly once", m.what, m.file);
        }
        let _restore = Restore { path: path.clone(), original: original.clone() };
        std::fs::write(&path, original.replacen(m.from, m.to, 1))?;
        eprintln!("mutant: {} ...", m.what);
        // Every test of the store and of replication: the simulation's seeds and scenarios, and
        // the rules' own tests.
        let out = Command::new("cargo")
            .current_dir(root())
            .args([
                "test",
                "--release",
                "--no-fail-fast",
                "-p",
                "atoll-kv",
                "-p",
                "atoll-sync",
                "--",
                "--nocapture",
            ])
            .env("ATOLL_SIM_SEEDS", seeds.to_string())
            .output()?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let failed: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED")))
            .collect();
        if !out.status.success() && failed.is_empty() {
            bail!("mutant \"{}\" did not build or run:\n{stderr}", m.what);
        }
        let seeds_failed = stderr.lines().filter(|l| l.contains("FAILED:")).count();
        if failed.is_empty() {
            report.push(format!("MISSED  {}", m.what));
            missed.push(m.what);
        } else {
            report.push(format!(
                "caught  {} ({seeds_failed} of {seeds} seeds fail; failing tests: {})",
                m.what,
                failed.join(", ")
            ));
        }
    }
    println!("{}", report.join("\n"));
    if !missed.is_empty() {
        bail!("the tests missed {} mutant(s): {missed:?}", missed.len());
    }
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds the guests and returns the directory holding the `.wasm` files.
fn build_guests() -> Result<PathBuf> {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    if !installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-wasip2")) {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))?;
    }
    let guests = root().join("guests");
    run(Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
        .arg(guests.join("Cargo.toml"))
        .env_remove("CARGO_TARGET_DIR"))?;
    Ok(guests.join("target/wasm32-wasip2/release"))
}

/// Builds the bench's minimal wasmtime host (an example of atoll-runtime) and returns its path.
fn build_minimal_host() -> Result<PathBuf> {
    run(Command::new("cargo")
        .args(["build", "--release", "-p", "atoll-runtime", "--example", "minimal-host"])
        .current_dir(root()))?;
    Ok(root().join("target/release/examples/minimal-host"))
}

/// Builds the `atoll` binary (and any other bins named) and returns the target dir.
fn build_bins(release: bool, packages: &[&str]) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.arg("build").current_dir(root());
    for p in packages {
        cmd.args(["-p", p]);
    }
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(root().join("target").join(if release { "release" } else { "debug" }))
}

/// A child process that prints `... listening on URL` first; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(cmd: &mut Command) -> Result<Server> {
        let mut child =
            cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start {cmd:?}"))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.split("listening on ").nth(1) {
                    Some(url) => {
                        let _ = tx.send(url.trim().to_owned());
                    }
                    None => println!("{line}"),
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => Ok(Server { child, url }),
            Err(_) => {
                let _ = child.kill();
                bail!("{cmd:?} did not start")
            }
        }
    }

    /// Total user+system CPU time the process has used so far.
    fn cpu_time(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let after = stat.rsplit_once(')').context("malformed /proc stat")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // The kernel reports in USER_HZ, which is 100 on Linux.
        Ok(Duration::from_millis(ticks * 10))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the guests and the binary, then becomes `atoll dev` with the example handlers
/// deployed: three sites and a router; Ctrl-C reaches `atoll dev`, which stops them all.
fn demo(listen: &str) -> Result<()> {
    let guests = build_guests()?;
    let atoll = build_bins(false, &["atoll"])?.join("atoll");
    let mut cmd = Command::new(&atoll);
    cmd.args(["dev", "--listen", listen, "--data"]).arg(root().join("target/demo"));
    for app in ["hello", "counter", "todo"] {
        cmd.arg("--deploy").arg(guests.join(format!("{app}.wasm"))).args(["--app", app]);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        Err(cmd.exec()).with_context(|| format!("cannot run {}", atoll.display()))
    }
    #[cfg(not(unix))]
    run(&mut cmd)
}

/// One wrk run's figures.
#[derive(Debug)]
struct Load {
    requests_per_sec: f64,
    p50: String,
    p99: String,
    requests: u64,
    errors: u64,
}

fn wrk(url: &str, seconds: u64, connections: u32) -> Result<Load> {
    wrk_with(url, seconds, connections, &[])
}

fn wrk_with(url: &str, seconds: u64, connections: u32, extra: &[&str]) -> Result<Load> {
    let threads = format!("-t{}", connections.min(2));
    let out = Command::new("wrk")
        .args([threads.as_str(), &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency"])
        .args(extra)
        .arg(url)
        .output()
        .context("cannot run wrk: install it (Debian: apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| -> Option<String> {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("wrk printed no request count")?;
    let errors = ["Non-2xx or 3xx responses:", "Socket errors:"]
        .iter()
        .filter_map(|p| field(p))
        .map(|v| v.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum::<u64>())
        .sum();
    Ok(Load {
        requests_per_sec: field("Requests/sec:").and_then(|v| v.parse().ok()).context("no Requests/sec")?,
        p50: field("50%").context("no p50")?,
        p99: field("99%").context("no p99")?,
        requests,
        errors,
    })
}

/// Quiet, comparable server processes: warnings only, no backtrace capture.
fn quiet(cmd: &mut Command) {
    cmd.env_remove("RUST_BACKTRACE").env("RUST_LOG", "warn").stderr(Stdio::inherit());
}

/// `hello` with a custom section naming `i` appended: a distinct component (its own content
/// hash, compiled and kept apart) that behaves the same.
fn distinct_hello(hello: &[u8], i: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n == 0 { byte } else { byte | 0x80 });
            if n == 0 {
                return;
            }
        }
    }
    let (name, payload) = (b"atoll-bench".as_slice(), i.to_string());
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(payload.as_bytes());
    let mut out = hello.to_vec();
    out.push(0); // a custom section
    leb(body.len(), &mut out);
    out.extend(body);
    out
}

/// The `atoll` binary of `baseline`: a path as is, else a git revision built in a worktree of
/// its own under the target dir (its own target dir too: sharing one with this tree would mix
/// the two builds' workspace crates).
fn baseline_binary(baseline: &str) -> Result<(PathBuf, Option<PathBuf>)> {
    let path = PathBuf::from(baseline);
    if path.is_file() {
        return Ok((path, None));
    }
    let out =
        Command::new("git").args(["rev-parse", "--verify", &format!("{baseline}^{{commit}}")]).output()?;
    if !out.status.success() {
        bail!("--baseline {baseline}: neither an atoll binary nor a git revision");
    }
    let rev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let tree = root().join("target").join(format!("baseline-{}", &rev[..12]));
    if !tree.join("Cargo.toml").exists() {
        run(Command::new("git")
            .args(["worktree", "add", "--detach", "--force"])
            .arg(&tree)
            .arg(&rev)
            .current_dir(root()))?;
    }
    run(Command::new("cargo")
        .args(["build", "--release", "-p", "atoll"])
        .current_dir(&tree)
        .env("CARGO_TARGET_DIR", tree.join("target")))?;
    Ok((tree.join("target/release/atoll"), Some(tree)))
}

/// Acknowledged durable writes per second at 32 writers, from `cargo bench -p atoll-kv` run in
/// the source tree `tree`: every write a new key (NaN for revisions whose bench lacks the case),
/// writes over 32,000 keys (the first of each a create), and overwrites of 640 keys.
fn store_writes(tree: &Path) -> Result<(f64, f64, f64)> {
    let out = Command::new("cargo")
        .args(["bench", "-p", "atoll-kv", "--bench", "writes"])
        .current_dir(tree)
        .env("CARGO_TARGET_DIR", if tree == root() { root().join("target") } else { tree.join("target") })
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = |case: &str| -> f64 {
        text.lines()
            .find(|l| l.contains(case))
            .and_then(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((
        rate("32 writers, max batch 1024, 1000000000 keys"),
        rate("32 writers, max batch 1024, 1000 keys"),
        rate("32 writers, max batch 1024,   20 keys"),
    ))
}

/// A rate, or a dash when it was not measured.
fn count(rate: f64) -> String {
    if rate.is_nan() { "—".into() } else { format!("{rate:.0}") }
}

/// What `bench --all` measures of one `atoll` binary.
#[derive(Default)]
struct Figures {
    hello_rps: f64,
    hello_cpu_us: f64,
    direct_rps: f64,
    routed_rps: f64,
    creates_rps: f64,
    increments_rps: f64,
    rss_mib: f64,
    store_creates: f64,
    store_spread: f64,
    store_overwrites: f64,
}

fn rss_mib(server: &Server) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(kib / 1024.0)
}

/// CPU per request (µs) and requests/s of `url` served by `server` under wrk.
fn cpu_per_request(server: &Server, url: &str, seconds: u64) -> Result<(f64, f64)> {
    let before = server.cpu_time()?;
    let load = wrk(url, seconds, 32)?;
    let cpu = server.cpu_time()? - before;
    Ok((cpu.as_secs_f64() * 1e6 / load.requests.max(1) as f64, load.requests_per_sec))
}

/// Router, key-value and memory figures of the `atoll` binary in `bins`.
fn figures_of(bins: &Path, guests: &Path, seconds: u64) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let mut f = Figures::default();
    // Router against the site directly, same app, same load.
    let site = region_site(bins, guests, dir.path(), "us-east-1", "us-east", "127.0.0.1:0")?;
    let router = start_router(bins, &[&site])?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    wait_until("the router to see us-east-1", || {
        Ok(router_sees(&agent, &router.url, "us-east-1")? == Some(true))
    })?;
    let region = ["-H", "x-atoll-region: us-east"];
    // Three alternating pairs, averaged: one pair moves by ±20 % with this VM's hour.
    for _ in 0..3 {
        f.direct_rps +=
            wrk_with(&format!("{}/apps/hello/", site.url), seconds, 32, &region)?.requests_per_sec / 3.0;
        f.routed_rps +=
            wrk_with(&format!("{}/apps/hello/", router.url), seconds, 32, &region)?.requests_per_sec / 3.0;
    }
    drop((router, site));
    // Durable key-value writes at 32 clients: creates (a new key every request) and increments
    // of one counter.
    let bin = bins.join("atoll");
    let site = bench_site(&bin, guests, &dir.path().join("kv"), &["counter"])?;
    run(Command::new(&bin)
        .args(["deploy", "--site", &site.url, "--app", "kv"])
        .arg(guests.join("kv-draft.wasm"))
        .env("ATOLL_ADMIN_TOKEN", "bench")
        .stdout(Stdio::null()))?;
    let creates = dir.path().join("creates.lua");
    std::fs::write(
        &creates,
        r#"local n = 0
request = function()
  n = n + 1
  return wrk.format("PUT", "/apps/kv/b/k" .. n .. "-" .. math.random(1e9), nil, "v")
end
"#,
    )?;
    let post = dir.path().join("post.lua");
    std::fs::write(&post, "wrk.method = \"POST\"\n")?;
    let script = |p: &Path| p.display().to_string();
    f.creates_rps =
        wrk_with(&format!("{}/", site.url), seconds, 32, &["-s", &script(&creates)])?.requests_per_sec;
    f.increments_rps =
        wrk_with(&format!("{}/apps/counter/hits", site.url), seconds, 32, &["-s", &script(&post)])?
            .requests_per_sec;
    drop(site);
    // Memory: 100 distinct small apps deployed, one request to each.
    let site = bench_site(&bin, guests, &dir.path().join("memory"), &[])?;
    let hello = std::fs::read(guests.join("hello.wasm"))?;
    for i in 0..100 {
        deploy_distinct(&bin, &site, dir.path(), &hello, i)?;
        agent.get(format!("{}/apps/app{i}/", site.url)).call()?;
    }
    f.rss_mib = rss_mib(&site)?;
    Ok(f)
}

fn bench_all(seconds: u64, rounds: usize, baseline: Option<&str>) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll", "xtask"])?;
    let mut base_tree = None;
    let base_bins = match baseline {
        Some(b) => {
            let (bin, tree) = baseline_binary(b)?;
            base_tree = tree;
            // region_site and friends run `atoll` from a directory.
            let dir = root().join("target").join("baseline-bin");
            std::fs::create_dir_all(&dir)?;
            std::fs::copy(&bin, dir.join("atoll"))?;
            Some(dir)
        }
        None => None,
    };
    let dir = tempfile::tempdir()?;
    let (native, minimal) = start_baselines(&bins, &guests)?;
    let mut sites = vec![bench_site(&bins.join("atoll"), &guests, &dir.path().join("site"), &["hello"])?];
    if let Some(b) = &base_bins {
        sites.push(bench_site(&b.join("atoll"), &guests, &dir.path().join("base"), &["hello"])?);
    }
    // hello: native, minimal host, site(s), taking turns over the rounds; means compared.
    let (mut native_fig, mut minimal_fig) = ((0.0, 0.0), (0.0, 0.0));
    let mut site_figs = vec![(0.0, 0.0); sites.len()];
    let n = rounds.max(1) as f64;
    for _ in 0..rounds.max(1) {
        let (cpu, rps) = cpu_per_request(&native, &format!("{}/", native.url), seconds)?;
        native_fig = (native_fig.0 + cpu / n, native_fig.1 + rps / n);
        let (cpu, rps) = cpu_per_request(&minimal, &format!("{}/", minimal.url), seconds)?;
        minimal_fig = (minimal_fig.0 + cpu / n, minimal_fig.1 + rps / n);
        for (i, site) in sites.iter().enumerate() {
            let (cpu, rps) = cpu_per_request(site, &format!("{}/apps/hello/", site.url), seconds)?;
            site_figs[i] = (site_figs[i].0 + cpu / n, site_figs[i].1 + rps / n);
        }
    }
    drop((sites, native, minimal));
    let mut figures = vec![figures_of(&bins, &guests, seconds)?];
    if let Some(b) = &base_bins {
        figures.push(figures_of(b, &guests, seconds)?);
    }
    for (f, (cpu, rps)) in figures.iter_mut().zip(&site_figs) {
        (f.hello_cpu_us, f.hello_rps) = (*cpu, *rps);
    }
    (figures[0].store_creates, figures[0].store_spread, figures[0].store_overwrites) = store_writes(&root())?;
    if let (Some(tree), Some(f)) = (&base_tree, figures.get_mut(1)) {
        (f.store_creates, f.store_spread, f.store_overwrites) = store_writes(tree)?;
    }
    println!();
    println!(
        "wrk -t2 -c32 -d{seconds}s, loopback, {rounds} rounds of hello; native axum {:.0} req/s ({:.1} µs CPU/request), minimal wasmtime host {:.0} req/s ({:.1} µs)",
        native_fig.1, native_fig.0, minimal_fig.1, minimal_fig.0
    );
    let mut header = format!("{:<44} {:>14}", "figure (target)", "this tree");
    if let Some(b) = baseline {
        header += &format!(" {:>14}", format!("baseline {}", &b[..b.len().min(8)]));
    }
    println!("{header}");
    type Row = (&'static str, fn(&Figures, (f64, f64), (f64, f64)) -> String);
    let rows: [Row; 10] = [
        ("site / native throughput (≥ 50 %)", |f, native, _| {
            format!("{:.1} %", f.hello_rps / native.1 * 100.0)
        }),
        ("site / minimal host CPU per request (≤ 1.3×)", |f, _, minimal| {
            format!("{:.2}×", f.hello_cpu_us / minimal.0)
        }),
        ("site CPU per request", |f, _, _| format!("{:.1} µs", f.hello_cpu_us)),
        ("router / direct throughput (≥ 0.6×)", |f, _, _| {
            format!("{:.2}×", f.routed_rps / f.direct_rps.max(1.0))
        }),
        ("store creates/s, 32 writers (≥ 20,000)", |f, _, _| count(f.store_creates)),
        ("store writes/s over 32,000 keys, 32 writers", |f, _, _| count(f.store_spread)),
        ("store overwrites/s of 640 keys, 32 writers", |f, _, _| count(f.store_overwrites)),
        ("kv guest creates/s, 32 clients (HTTP)", |f, _, _| format!("{:.0}", f.creates_rps)),
        ("counter guest increments/s, 32 clients", |f, _, _| format!("{:.0}", f.increments_rps)),
        ("RSS, 100 small apps (≤ 256 MiB)", |f, _, _| format!("{:.0} MiB", f.rss_mib)),
    ];
    for (name, value) in rows {
        let mut line = format!("{name:<44}");
        for f in &figures {
            line += &format!(" {:>14}", value(f, native_fig, minimal_fig));
        }
        println!("{line}");
    }
    Ok(())
}

/// Deploys `hello` made distinct by `i` ([`distinct_hello`]) as the app `app{i}`.
fn deploy_distinct(bin: &Path, site: &Server, dir: &Path, hello: &[u8], i: usize) -> Result<()> {
    let path = dir.join(format!("app{i}.wasm"));
    std::fs::write(&path, distinct_hello(hello, i))?;
    run(Command::new(bin)
        .args(["deploy", "--site", &site.url, "--app", &format!("app{i}")])
        .arg(&path)
        .env("ATOLL_ADMIN_TOKEN", "bench")
        .stdout(Stdio::null()))
}

fn bench_memory(apps: usize) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll"])?;
    let bin = bins.join("atoll");
    let dir = tempfile::tempdir()?;
    let site = bench_site(&bin, &guests, &dir.path().join("site"), &[])?;
    let status = |what: &str| -> Result<()> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", site.child.id()))?;
        let field = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        println!(
            "{what:<44} RSS {:>7.1} MiB   virtual {:>6.0} GiB",
            field("VmRSS:") / 1024.0,
            field("VmSize:") / 1024.0 / 1024.0
        );
        Ok(())
    };
    println!("release site, default [runtime]; {apps} distinct small apps (hello, each compiled apart)");
    status("idle, no app")?;
    let hello = std::fs::read(guests.join("hello.wasm"))?;
    for i in 0..apps {
        deploy_distinct(&bin, &site, dir.path(), &hello, i)?;
    }
    status(&format!("idle, {apps} apps deployed"))?;
    for i in 0..apps {
        let response = ureq::get(&format!("{}/apps/app{i}/", site.url)).call()?;
        if response.status() != 200 {
            bail!("app{i} answered {}", response.status());
        }
    }
    status("after one request to each")?;
    let load = wrk(&format!("{}/apps/app0/", site.url), 5, 32)?;
    println!("wrk -t2 -c32 -d5s on one app: {:.0} req/s", load.requests_per_sec);
    status("after the load")?;
    Ok(())
}

/// Starts a release site in `dir` with `app` deployed from the built guests.
/// A release site run by the `atoll` binary `bin`, with `apps` deployed.
fn bench_site(bin: &Path, guests: &Path, dir: &Path, apps: &[&str]) -> Result<Server> {
    let mut site_cmd = Command::new(bin);
    site_cmd
        .args(["site", "--name", "bench", "--region", "local", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir)
        .env("ATOLL_ADMIN_TOKEN", "bench");
    quiet(&mut site_cmd);
    let site = Server::start(&mut site_cmd)?;
    for file in apps {
        // App names take '-' where cdylib file names have '_' (spin_hello.wasm: spin-hello).
        let app = file.replace('_', "-");
        run(Command::new(bin)
            .args(["deploy", "--site", &site.url, "--app", &app])
            .arg(guests.join(format!("{file}.wasm")))
            .env("ATOLL_ADMIN_TOKEN", "bench")
            .stdout(Stdio::null()))?;
    }
    Ok(site)
}

fn bench_kv(seconds: u64) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll"])?;
    let dir = tempfile::tempdir()?;
    let site = bench_site(&bins.join("atoll"), &guests, dir.path(), &["counter"])?;
    let script = dir.path().join("post.lua");
    std::fs::write(&script, "wrk.method = \"POST\"\n")?;
    let script = script.display().to_string();
    println!(
        "counter guest on a release site, wrk on loopback, {seconds}s per case; every POST is an acknowledged durable increment"
    );
    println!("{:<34} {:>10} {:>10} {:>10} {:>8}", "case", "req/s", "p50", "p99", "errors");
    for (name, connections, extra) in [
        ("increment, 1 client", 1, vec!["-s", script.as_str()]),
        ("increment, 32 clients", 32, vec!["-s", script.as_str()]),
        ("increment, 256 clients", 256, vec!["-s", script.as_str()]),
        ("read (GET), 32 clients", 32, vec![]),
    ] {
        let load = wrk_with(&format!("{}/apps/counter/hits", site.url), seconds, connections, &extra)?;
        println!(
            "{name:<34} {:>10.0} {:>10} {:>10} {:>8}",
            load.requests_per_sec, load.p50, load.p99, load.errors
        );
    }
    Ok(())
}

/// An older `atoll` binary to measure beside the current one in the same run
/// (`ATOLL_BENCH_BASELINE=/path/to/atoll`): what a change costs, within one run's noise.
fn baseline() -> Option<PathBuf> {
    std::env::var_os("ATOLL_BENCH_BASELINE").map(PathBuf::from)
}

/// A CA and one certificate for 127.0.0.1 and localhost, as PEM files in `dir`; returns the
/// `[tls]` section serving it and trusting the CA.
fn bench_tls(dir: &Path) -> Result<String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
    leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = leaf.signed_by(&key, &issuer)?;
    let (ca_file, cert_file, key_file) = (dir.join("ca.pem"), dir.join("site.pem"), dir.join("site.key"));
    std::fs::write(&ca_file, ca_cert.pem())?;
    std::fs::write(&cert_file, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    Ok(format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
        cert_file.display().to_string(),
        key_file.display().to_string(),
        ca_file.display().to_string()
    ))
}

/// An HTTP client trusting the CA of [`bench_tls`] (and the web's roots otherwise).
fn bench_agent(dir: &Path) -> Result<ureq::Agent> {
    let mut tls = ureq::tls::TlsConfig::builder();
    let ca = dir.join("ca.pem");
    if ca.exists() {
        let certs: Vec<_> = ureq::tls::parse_pem(&std::fs::read(&ca)?)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                _ => None,
            })
            .collect();
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder().http_status_as_error(false).tls_config(tls.build()).build().into())
}

fn bench_sync(writes: usize, with_tls: bool) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll"])?;
    let mut cases: Vec<(String, PathBuf, bool)> = vec![("current".into(), bins.join("atoll"), false)];
    if let Some(old) = baseline() {
        cases.push((format!("baseline {}", old.display()), old, false));
    }
    if with_tls {
        cases.push(("current, TLS between the sites".into(), bins.join("atoll"), true));
    }
    println!(
        "two release sites on loopback, kv-draft guest; a PUT acknowledged at a, then GET at b until it reads the value; {writes} writes per case"
    );
    for (name, bin, tls) in cases {
        let latencies = sync_latencies(&bin, &guests, writes, tls)?;
        let at = |q: f64| percentile(&latencies, q);
        println!(
            "{name:<48} p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}",
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0)
        );
    }
    Ok(())
}

/// Replication latencies between two fresh sites run by `bin`, sorted.
fn sync_latencies(bin: &Path, guests: &Path, writes: usize, tls: bool) -> Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("site.toml");
    std::fs::write(&config, if tls { bench_tls(dir.path())? } else { String::new() })?;
    let secret = "bench-peer-secret-0123456789";
    let start = |name: &str, peer: Option<&str>| -> Result<Server> {
        let mut cmd = Command::new(bin);
        // --insecure-dev: the shared development deploy key (a replicating site needs one); the
        // peer secret and admin token are the ones given here.
        cmd.args(["site", "--name", name, "--region", "local", "--listen", "127.0.0.1:0", "--insecure-dev"])
            .arg("--data")
            .arg(dir.path().join(name))
            .env("ATOLL_ADMIN_TOKEN", "bench")
            .env("ATOLL_PEER_SECRET", secret);
        if tls {
            cmd.arg("--config").arg(&config);
        }
        if let Some(peer) = peer {
            cmd.args(["--peer", peer]);
        }
        quiet(&mut cmd);
        Server::start(&mut cmd)
    };
    let a = start("a", None)?;
    let b = start("b", Some(&a.url))?;
    let mut deploy = Command::new(bin);
    deploy.args(["deploy", "--site", &a.url, "--app", "kv"]).arg(guests.join("kv-draft.wasm"));
    if tls {
        deploy.arg("--ca-file").arg(dir.path().join("ca.pem"));
    }
    run(deploy.env("ATOLL_ADMIN_TOKEN", "bench").stdout(Stdio::null()))?;
    let agent = bench_agent(dir.path())?;
    let wait = std::time::Instant::now();
    while agent.get(format!("{}/apps/kv/b/none", b.url)).call()?.status() != 404
        || agent.get(format!("{}/_atoll/health", b.url)).call()?.status() != 200
        || !agent
            .get(format!("{}/_atoll/sync/status", b.url))
            .call()?
            .body_mut()
            .read_to_string()?
            .contains("\"site\":\"a\"")
    {
        if wait.elapsed() > Duration::from_secs(60) {
            bail!("site b never served the kv app");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut latencies = Vec::with_capacity(writes);
    for i in 0..writes {
        let value = format!("value-{i}");
        let put = agent.put(format!("{}/apps/kv/b/key-{i}", a.url)).send(value.as_bytes())?;
        if put.status() != 200 {
            bail!("PUT at a answered {}", put.status());
        }
        let acknowledged = std::time::Instant::now();
        loop {
            let mut r = agent.get(format!("{}/apps/kv/b/key-{i}", b.url)).call()?;
            if r.status() == 200 && r.body_mut().read_to_string()? == value {
                break;
            }
            if acknowledged.elapsed() > Duration::from_secs(30) {
                bail!("write {i} never reached b");
            }
        }
        latencies.push(acknowledged.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

/// Starts a release site named `name` in `region` with data in `dir/name` at `listen`, with the
/// apps deployed (unless already there).
fn region_site(
    bins: &Path,
    guests: &Path,
    dir: &Path,
    name: &str,
    region: &str,
    listen: &str,
) -> Result<Server> {
    let mut cmd = Command::new(bins.join("atoll"));
    cmd.args(["site", "--name", name, "--region", region, "--listen", listen, "--data"])
        .arg(dir.join(name))
        .env("ATOLL_ADMIN_TOKEN", "bench");
    quiet(&mut cmd);
    let site = Server::start(&mut cmd)?;
    run(Command::new(bins.join("atoll"))
        .args(["deploy", "--site", &site.url, "--app", "hello"])
        .arg(guests.join("hello.wasm"))
        .env("ATOLL_ADMIN_TOKEN", "bench")
        .stdout(Stdio::null()))?;
    Ok(site)
}

fn start_router(bins: &Path, sites: &[&Server]) -> Result<Server> {
    let mut cmd = Command::new(bins.join("atoll"));
    cmd.args(["router", "--listen", "127.0.0.1:0"]);
    for site in sites {
        cmd.args(["--site", &site.url]);
    }
    quiet(&mut cmd);
    Server::start(&mut cmd)
}

/// Whether the router at `router` sees the site named `name` live (`None`: not known yet).
fn router_sees(agent: &ureq::Agent, router: &str, name: &str) -> Result<Option<bool>> {
    let body = agent.get(format!("{router}/_atoll/router/status")).call()?.body_mut().read_to_string()?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let sites = status["sites"].as_array().context("no sites in the router status")?;
    Ok(sites.iter().find(|s| s["name"] == name).and_then(|s| s["live"].as_bool()))
}

fn wait_until(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !f()? {
        if std::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// A minimal HTTP/1.1 client on one kept-alive connection, so that latency measurements show
/// the servers' time rather than a client library's.
struct RawClient {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    fn connect(url: &str) -> Result<RawClient> {
        let stream = std::net::TcpStream::connect(url.trim_start_matches("http://"))?;
        stream.set_nodelay(true)?;
        Ok(RawClient { stream, buf: Vec::with_capacity(64 << 10) })
    }

    /// One GET, timed from the first byte sent to the last byte of the body received.
    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Duration> {
        use std::io::{Read, Write};
        let mut request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n");
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        let started = std::time::Instant::now();
        self.stream.write_all(request.as_bytes())?;
        self.buf.clear();
        let mut chunk = [0u8; 16 << 10];
        loop {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed mid-response");
            }
            self.buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&self.buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                    })
                    .context("a response without content-length")?
                    .parse()?;
                if self.buf.len() >= end + 4 + length {
                    return Ok(started.elapsed());
                }
            }
        }
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// What TLS between a router and a site adds: the same GETs through a router to a plain site and
/// through a router to a site serving TLS (the router's connections are pooled: this is the
/// per-request cost, not the handshake's), interleaved.
fn router_tls_cost(
    bins: &Path,
    guests: &Path,
    dir: &Path,
    plain_site: &Server,
    requests: usize,
) -> Result<()> {
    let tls_dir = dir.join("tls");
    std::fs::create_dir_all(&tls_dir)?;
    let site_config = tls_dir.join("site.toml");
    std::fs::write(&site_config, bench_tls(&tls_dir)?)?;
    let router_config = tls_dir.join("router.toml");
    std::fs::write(
        &router_config,
        format!("[tls]\nca_file = {:?}\n", tls_dir.join("ca.pem").display().to_string()),
    )?;
    let mut cmd = Command::new(bins.join("atoll"));
    cmd.args(["site", "--name", "us-east-tls", "--region", "us-east", "--listen", "127.0.0.1:0", "--data"])
        .arg(tls_dir.join("data"))
        .arg("--config")
        .arg(&site_config)
        .env("ATOLL_ADMIN_TOKEN", "bench");
    quiet(&mut cmd);
    let site = Server::start(&mut cmd)?;
    run(Command::new(bins.join("atoll"))
        .args(["deploy", "--site", &site.url, "--app", "hello", "--ca-file"])
        .arg(tls_dir.join("ca.pem"))
        .arg(guests.join("hello.wasm"))
        .env("ATOLL_ADMIN_TOKEN", "bench")
        .stdout(Stdio::null()))?;
    let plain = start_router(bins, &[plain_site])?;
    let mut cmd = Command::new(bins.join("atoll"));
    cmd.args(["router", "--listen", "127.0.0.1:0", "--site", &site.url, "--config"]).arg(&router_config);
    quiet(&mut cmd);
    let tls = Server::start(&mut cmd)?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    for (router, name) in [(&plain, "us-east-1"), (&tls, "us-east-tls")] {
        wait_until(&format!("the router to see {name}"), || {
            Ok(router_sees(&agent, &router.url, name)? == Some(true))
        })?;
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let ((p50, p99), (t50, t99)) = interleaved(&plain.url, &tls.url, "/apps/hello/", requests)?;
    println!(
        "\nrouter → site over TLS, /apps/hello/: plain p50 {:.0}µs p99 {:.0}µs; TLS p50 {:.0}µs p99 {:.0}µs; TLS adds {:.0}µs at p50, {:.0}µs at p99",
        us(p50),
        us(p99),
        us(t50),
        us(t99),
        us(t50) - us(p50),
        us(t99) - us(p99)
    );
    Ok(())
}

/// `requests` sequential GETs of `path` (after 500 to warm up) to `a` and `b` in turns, one
/// kept-alive connection each: (p50, p99) of each.
fn interleaved(a: &str, b: &str, path: &str, requests: usize) -> Result<(Percentiles, Percentiles)> {
    let (mut to_a, mut to_b) = (RawClient::connect(a)?, RawClient::connect(b)?);
    let (mut times_a, mut times_b) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
    // Blocks of requests to each in turn, not one request each in turn: a request that follows
    // one to the other target right away finds the machine awake (on this VM a loopback round
    // trip to the site takes ~30 µs then, ~100 µs from idle), which flatters whichever target
    // goes second. Blocks still spread the machine's drift over both.
    const BLOCK: usize = 250;
    for i in 0..(requests + 500).div_ceil(BLOCK) {
        for (client, into) in [(&mut to_a, &mut times_a), (&mut to_b, &mut times_b)] {
            for _ in 0..BLOCK {
                let took = client.get(path, &[("x-atoll-region", "us-east")])?;
                if i >= 500 / BLOCK {
                    into.push(took);
                }
            }
        }
    }
    times_a.sort();
    times_b.sort();
    let p = |t: &[Duration]| (percentile(t, 0.5), percentile(t, 0.99));
    Ok((p(&times_a), p(&times_b)))
}

/// p50 and p99.
type Percentiles = (Duration, Duration);

fn bench_router(requests: usize, kills: usize, with_tls: bool) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll"])?;
    let dir = tempfile::tempdir()?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();

    // Overhead: the same requests to the site directly and through a router, interleaved, one
    // keep-alive connection each, sequential (latency, not throughput).
    let a = region_site(&bins, &guests, dir.path(), "us-east-1", "us-east", "127.0.0.1:0")?;
    let router = start_router(&bins, &[&a])?;
    wait_until("the router to see us-east-1", || {
        Ok(router_sees(&agent, &router.url, "us-east-1")? == Some(true))
    })?;
    println!(
        "release site and release router on loopback; {requests} sequential GETs per case, one kept-alive connection each (a minimal client), in alternating blocks of 250"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "path", "direct p50", "p99", "router p50", "p99", "added p50", "added p99"
    );
    for path in ["/apps/hello/", "/apps/none/"] {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let ((d50, d99), (r50, r99)) = interleaved(&a.url, &router.url, path, requests)?;
        println!(
            "{path:<28} {:>8.0}µs {:>8.0}µs {:>8.0}µs {:>8.0}µs {:>10.0}µs {:>10.0}µs",
            us(d50),
            us(d99),
            us(r50),
            us(r99),
            us(r50) - us(d50),
            us(r99) - us(d99)
        );
    }
    drop(router);
    if with_tls {
        router_tls_cost(&bins, &guests, dir.path(), &a, requests)?;
    }

    // Failover: SIGKILL eu-west-1 (the nearest for eu-west clients) and time how long until the
    // router takes it out of rotation, with no traffic (active health checks alone) and with
    // a request right after the kill (the passive signal); then restart it and time its return.
    let mut b = region_site(&bins, &guests, dir.path(), "eu-west-1", "eu-west", "127.0.0.1:0")?;
    let b_listen = b.url.trim_start_matches("http://").to_owned();
    let router = start_router(&bins, &[&a, &b])?;
    // A hung site (SIGSTOP: connections are accepted by the kernel, nothing answers) is found
    // by check timeouts only; five of those after the kills.
    let hung = 5;
    let (mut active, mut passive, mut back, mut stopped, mut resumed) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..hung.min(kills) {
        wait_until("eu-west-1 live", || Ok(router_sees(&agent, &router.url, "eu-west-1")? == Some(true)))?;
        let pid = b.child.id().to_string();
        run(Command::new("kill").args(["-STOP", &pid]))?;
        let paused = std::time::Instant::now();
        wait_until("eu-west-1 down", || Ok(router_sees(&agent, &router.url, "eu-west-1")? == Some(false)))?;
        stopped.push(paused.elapsed());
        run(Command::new("kill").args(["-CONT", &pid]))?;
        let continued = std::time::Instant::now();
        wait_until("eu-west-1 back", || Ok(router_sees(&agent, &router.url, "eu-west-1")? == Some(true)))?;
        resumed.push(continued.elapsed());
    }
    for k in 0..kills {
        wait_until("eu-west-1 live", || Ok(router_sees(&agent, &router.url, "eu-west-1")? == Some(true)))?;
        let _ = b.child.kill();
        let _ = b.child.wait();
        let killed = std::time::Instant::now();
        if k % 2 == 0 {
            wait_until("eu-west-1 down", || {
                Ok(router_sees(&agent, &router.url, "eu-west-1")? == Some(false))
            })?;
            active.push(killed.elapsed());
        } else {
            let r = agent
                .get(format!("{}/apps/hello/", router.url))
                .header("x-atoll-region", "eu-west")
                .call()?;
            let site = r.headers().get("x-atoll-site").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            if r.status() != 200 || site != "us-east-1" {
                bail!("the request after the kill was not failed over: {} from {site:?}", r.status());
            }
            passive.push(killed.elapsed());
        }
        b = region_site(&bins, &guests, dir.path(), "eu-west-1", "eu-west", &b_listen)?;
        let restarted = std::time::Instant::now();
        wait_until("eu-west-1 back", || Ok(router_sees(&agent, &router.url, "eu-west-1")? == Some(true)))?;
        back.push(restarted.elapsed());
    }
    let report = |what: &str, mut v: Vec<Duration>| {
        v.sort();
        if !v.is_empty() {
            println!(
                "{what:<58} n={:<3} min {:>7.1?}  median {:>7.1?}  max {:>7.1?}",
                v.len(),
                v[0],
                percentile(&v, 0.5),
                v[v.len() - 1]
            );
        }
    };
    println!(
        "\nfailover over {kills} SIGKILLs of the nearest site (default health checks: 200 ms, timeout 250 ms, fall 2, rise 2)"
    );
    report("out of rotation, no traffic (active checks)", active);
    report("first request after the kill answered by the next site", passive);
    report("back in rotation after the restart's listen line", back);
    report("hung (SIGSTOP): out of rotation, no traffic", stopped);
    report("hung: back in rotation after SIGCONT", resumed);
    Ok(())
}

/// The two servers a site is measured against: the native axum route and the minimal host.
fn start_baselines(bins: &Path, guests: &Path) -> Result<(Server, Server)> {
    let mut native_cmd = Command::new(bins.join("native-hello"));
    quiet(&mut native_cmd);
    let native = Server::start(&mut native_cmd)?;
    let mut minimal_cmd = Command::new(build_minimal_host()?);
    minimal_cmd.arg(guests.join("hello.wasm"));
    quiet(&mut minimal_cmd);
    Ok((native, Server::start(&mut minimal_cmd)?))
}

fn bench(seconds: u64, connections: u32, rounds: Option<usize>) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll", "xtask"])?;
    let dir = tempfile::tempdir()?;
    let site =
        bench_site(&bins.join("atoll"), &guests, &dir.path().join("current"), &["hello", "spin_hello"])?;
    let (native, minimal) = start_baselines(&bins, &guests)?;
    let old = match baseline() {
        Some(bin) => Some((bench_site(&bin, &guests, &dir.path().join("baseline"), &["hello"])?, bin)),
        None => None,
    };

    println!(
        "wrk -t2 -c{connections} -d{seconds}s, loopback, {} cores, RUST_LOG=warn, RUST_BACKTRACE unset",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "target", "req/s", "p50", "p99", "CPU µs/req", "errors"
    );
    let mut targets = vec![
        ("native axum".to_owned(), &native, "/"),
        ("atoll site, hello.wasm".to_owned(), &site, "/apps/hello/"),
        ("minimal wasmtime host".to_owned(), &minimal, "/"),
    ];
    if let Some((server, bin)) = &old {
        targets.push((format!("baseline site ({})", bin.display()), server, "/apps/hello/"));
    }
    // The same greeting from a WASI 0.3 handler (spin-sdk 7), last.
    targets.push(("atoll site, spin_hello (0.3)".to_owned(), &site, "/apps/spin-hello/"));
    // With a baseline, the site and the baseline take turns over three rounds (this machine's
    // speed drifts within a run: alternating keeps the comparison fair); the means are compared.
    let rounds = rounds.unwrap_or(if old.is_some() { 3 } else { 1 }).max(1);
    let mut totals = vec![(0.0f64, 0.0f64); targets.len()];
    for (_, server, path) in &targets {
        wrk(&format!("{}{path}", server.url), 2, connections)?; // warm-up
    }
    for _ in 0..rounds {
        for (i, (name, server, path)) in targets.iter().enumerate() {
            let url = format!("{}{path}", server.url);
            let before = server.cpu_time()?;
            let load = wrk(&url, seconds, connections)?;
            let cpu = server.cpu_time()? - before;
            let us_per_req = cpu.as_secs_f64() * 1e6 / load.requests.max(1) as f64;
            println!(
                "{name:<28} {:>10.0} {:>10} {:>10} {:>12.1} {:>8}",
                load.requests_per_sec, load.p50, load.p99, us_per_req, load.errors
            );
            totals[i].0 += load.requests_per_sec / rounds as f64;
            totals[i].1 += us_per_req / rounds as f64;
        }
    }
    let ratio = totals[1].0 / totals[0].0;
    println!("atoll / native throughput: {:.1}% (target ≥ 50%)", ratio * 100.0);
    println!(
        "minimal host / native throughput: {:.1}%; atoll CPU per request / minimal host's: {:.2}× (target ≤ 1.3×)",
        totals[2].0 / totals[0].0 * 100.0,
        totals[1].1 / totals[2].1
    );
    let p3 = totals[targets.len() - 1];
    println!(
        "WASI 0.3 hello (spin-sdk 7) / WASI 0.2 hello (wstd), same site: throughput {:.1}%, CPU per request {:.2}×; 0.3 / native throughput {:.1}%",
        p3.0 / totals[1].0 * 100.0,
        p3.1 / totals[1].1,
        p3.0 / totals[0].0 * 100.0
    );
    if let Some(base) = totals.get(3).filter(|_| old.is_some()) {
        println!(
            "atoll / baseline over {rounds} alternating rounds: throughput {:.1}%, CPU per request {:.1}%",
            totals[1].0 / base.0 * 100.0,
            totals[1].1 / base.1 * 100.0
        );
    }
    Ok(())
}
