//! `cargo xtask`: the project's tasks.
//!
//! - `build-guests`: build `guests/` for wasm32-wasip2 (installing the target if missing).
//! - `demo`: build, start three replicating sites, deploy the example handlers, print the curl
//!   lines; Ctrl-C stops them.
//! - `bench`: load `hello` through a release site and a native axum route in the same run, and
//!   print requests/s, p50/p99 latency, server CPU per request and the ratio.
//! - `bench-kv`: durable key-value writes and reads through the counter guest.
//! - `bench-sync`: push-path replication latency between two release sites.
//! - `sim`: the replication simulation over many seeds.

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
    /// Start three local replicating sites with the example handlers deployed.
    Demo {
        /// Where the first site listens (the others take the next ports).
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
    },
    /// The deterministic replication simulation over many seeds (release build).
    Sim {
        /// Seeds 0..N.
        #[arg(long, default_value_t = 10_000)]
        seeds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildGuests => build_guests().map(drop),
        Task::Demo { listen } => demo(&listen),
        Task::Bench { duration, connections } => bench(duration, connections),
        Task::BenchKv { duration } => bench_kv(duration),
        Task::BenchSync { writes } => bench_sync(writes),
        Task::Sim { seeds } => run(Command::new("cargo")
            .current_dir(root())
            .args(["test", "--release", "-p", "atoll-sync", "--test", "sim", "--", "--nocapture"])
            .env("ATOLL_SIM_SEEDS", seeds.to_string())),
    }
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

fn demo(listen: &str) -> Result<()> {
    let guests = build_guests()?;
    let atoll = build_bins(false, &["atoll"])?.join("atoll");
    let token = std::env::var("ATOLL_ADMIN_TOKEN").unwrap_or_else(|_| "demo-token".into());
    let secret = std::env::var("ATOLL_PEER_SECRET").unwrap_or_else(|_| "demo-peer-secret-change-me".into());
    let first: std::net::SocketAddr = listen.parse().with_context(|| format!("--listen {listen}"))?;
    let mut sites: Vec<(String, Server)> = Vec::new();
    for (i, (name, region)) in
        [("us-east-1", "us-east"), ("eu-west-1", "eu-west"), ("ap-south-1", "ap-south")]
            .into_iter()
            .enumerate()
    {
        let addr = std::net::SocketAddr::new(first.ip(), first.port() + i as u16);
        let mut cmd = Command::new(&atoll);
        cmd.args(["site", "--name", name, "--region", region, "--listen", &addr.to_string(), "--data"])
            .arg(root().join("target/demo").join(name))
            .env("ATOLL_ADMIN_TOKEN", &token)
            .env("ATOLL_PEER_SECRET", &secret);
        if let Some((_, first)) = sites.first() {
            cmd.args(["--peer", &first.url]);
        }
        sites.push((name.to_owned(), Server::start(&mut cmd)?));
    }
    let url = sites[0].1.url.clone();
    for app in ["hello", "counter", "todo"] {
        run(Command::new(&atoll)
            .args(["deploy", "--site", &url, "--app", app])
            .arg(guests.join(format!("{app}.wasm")))
            .env("ATOLL_ADMIN_TOKEN", &token)
            .stdout(Stdio::null()))?;
    }
    // Deploys replicate: wait until every site serves every app.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (name, site) in &sites {
        for app in ["hello", "counter", "todo"] {
            while agent
                .get(format!("{}/_atoll/apps/{app}", site.url))
                .header("authorization", format!("Bearer {token}"))
                .call()?
                .status()
                != 200
            {
                if std::time::Instant::now() > deadline {
                    bail!("{app} did not replicate to {name}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    println!(
        "\nThree Atoll sites are running and replicating (data in {}):",
        root().join("target/demo").display()
    );
    for (name, site) in &sites {
        println!("  {name:<11} {}", site.url);
    }
    let (a, b, c) = (&sites[0].1.url, &sites[1].1.url, &sites[2].1.url);
    println!("hello, counter and todo were deployed at us-east-1 and replicated to the others. Try:");
    println!("  curl {a}/apps/hello/");
    println!("  curl -H 'Host: hello.localhost' {b}/");
    println!("  curl -X POST {a}/apps/counter/visits; curl -X POST {b}/apps/counter/visits");
    println!(
        "  curl {c}/apps/counter/visits                       # the total of the increments at every site"
    );
    println!("  curl -X POST {a}/apps/todo/ -d '{{\"title\":\"try atoll\"}}'");
    println!("  curl {c}/apps/todo/                                # the item, replicated");
    println!("  curl {b}/_atoll/sync/status                        # replication, per peer");
    println!("  ATOLL_ADMIN_TOKEN={token} target/debug/atoll apps --site {a}");
    println!("Press Ctrl-C to stop them all.");
    for (name, mut site) in sites {
        let status = site.child.wait()?;
        println!("{name} stopped ({status})");
    }
    Ok(())
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

/// Starts a release site in `dir` with `app` deployed from the built guests.
fn bench_site(bins: &Path, guests: &Path, dir: &Path, apps: &[&str]) -> Result<Server> {
    let mut site_cmd = Command::new(bins.join("atoll"));
    site_cmd
        .args(["site", "--name", "bench", "--region", "local", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir)
        .env("ATOLL_ADMIN_TOKEN", "bench");
    quiet(&mut site_cmd);
    let site = Server::start(&mut site_cmd)?;
    for app in apps {
        run(Command::new(bins.join("atoll"))
            .args(["deploy", "--site", &site.url, "--app", app])
            .arg(guests.join(format!("{app}.wasm")))
            .env("ATOLL_ADMIN_TOKEN", "bench")
            .stdout(Stdio::null()))?;
    }
    Ok(site)
}

fn bench_kv(seconds: u64) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll"])?;
    let dir = tempfile::tempdir()?;
    let site = bench_site(&bins, &guests, dir.path(), &["counter"])?;
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

fn bench_sync(writes: usize) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll"])?;
    let dir = tempfile::tempdir()?;
    let secret = "bench-peer-secret-0123456789";
    let start = |name: &str, peer: Option<&str>| -> Result<Server> {
        let mut cmd = Command::new(bins.join("atoll"));
        cmd.args(["site", "--name", name, "--region", "local", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join(name))
            .env("ATOLL_ADMIN_TOKEN", "bench")
            .env("ATOLL_PEER_SECRET", secret);
        if let Some(peer) = peer {
            cmd.args(["--peer", peer]);
        }
        quiet(&mut cmd);
        Server::start(&mut cmd)
    };
    let a = start("a", None)?;
    let b = start("b", Some(&a.url))?;
    run(Command::new(bins.join("atoll"))
        .args(["deploy", "--site", &a.url, "--app", "kv"])
        .arg(guests.join("kv-draft.wasm"))
        .env("ATOLL_ADMIN_TOKEN", "bench")
        .stdout(Stdio::null()))?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
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
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "two release sites on loopback, kv-draft guest; a PUT acknowledged at a, then GET at b until it reads the value"
    );
    println!(
        "replication latency over {writes} writes: p50 {:.2?}  p90 {:.2?}  p99 {:.2?}  max {:.2?}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

fn bench(seconds: u64, connections: u32) -> Result<()> {
    let guests = build_guests()?;
    let bins = build_bins(true, &["atoll", "xtask"])?;
    let dir = tempfile::tempdir()?;
    let site = bench_site(&bins, &guests, dir.path(), &["hello"])?;
    let mut native_cmd = Command::new(bins.join("native-hello"));
    quiet(&mut native_cmd);
    let native = Server::start(&mut native_cmd)?;

    println!(
        "wrk -t2 -c{connections} -d{seconds}s, loopback, {} cores, RUST_LOG=warn, RUST_BACKTRACE unset",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "target", "req/s", "p50", "p99", "CPU µs/req", "errors"
    );
    let mut results = Vec::new();
    for (name, server, path) in
        [("native axum", &native, "/"), ("atoll site, hello.wasm", &site, "/apps/hello/")]
    {
        let url = format!("{}{path}", server.url);
        wrk(&url, 2, connections)?; // warm-up
        let before = server.cpu_time()?;
        let load = wrk(&url, seconds, connections)?;
        let cpu = server.cpu_time()? - before;
        let us_per_req = cpu.as_secs_f64() * 1e6 / load.requests.max(1) as f64;
        println!(
            "{name:<28} {:>10.0} {:>10} {:>10} {:>12.1} {:>8}",
            load.requests_per_sec, load.p50, load.p99, us_per_req, load.errors
        );
        results.push(load);
    }
    let ratio = results[1].requests_per_sec / results[0].requests_per_sec;
    println!("atoll / native throughput: {:.1}% (target ≥ 50%)", ratio * 100.0);
    Ok(())
}
