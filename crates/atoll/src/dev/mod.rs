//! `atoll dev`: several sites and a router on this machine, each its own process with its own
//! data dir and port, the sites peered with each other. Ctrl-C (or SIGTERM) stops them all; a
//! child is killed if `atoll dev` itself dies (however: SIGKILL included), so nothing is left
//! running, and a new `atoll dev` waits for their ports to be free.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{ClientArgs, DeployArgs};

mod rehearse;
use rehearse::{Action, State, StateSite, stopped_marker};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    /// Rehearse a failure on a running `atoll dev` instead of starting one.
    #[command(subcommand)]
    action: Option<Action>,
    /// The regions to run a site in, comma-separated; site names are REGION-1 (REGION-2, ...).
    #[arg(long, value_delimiter = ',', default_value = "us-east,eu-west,ap-south")]
    sites: Vec<String>,
    /// TOML configuration file given to every site and the router.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The router's address; the sites listen on the next ports (port 0: free ports for all).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the sites keep their data, one directory per site (kept between runs).
    #[arg(long, default_value = ".atoll/dev")]
    data: PathBuf,
    /// A component to deploy once the sites are up; pair each with an --app.
    #[arg(long = "deploy")]
    deploy: Vec<PathBuf>,
    /// The app name for the --deploy at the same position.
    #[arg(long = "app")]
    apps: Vec<String>,
    /// Override a config field of every site and the router, e.g. --set sync.anti_entropy_ms=1000.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// A site that dies (try `kill -9 PID`) is restarted after this many seconds; 0: never,
    /// and `atoll dev` stops instead.
    #[arg(long, default_value_t = 10)]
    restart_after_s: u64,
    /// Once ready, play this scenario (see `atoll drill --help`) under a client workload on the
    /// first --app (which must count, like the counter example) and print the drill's report.
    #[arg(long)]
    scenario: Option<PathBuf>,
}

fn write_state(data: &Path, sites: &[(String, String, Proc)]) -> Result<()> {
    let state = State {
        pid: std::process::id(),
        sites: sites
            .iter()
            .map(|(name, _, p)| StateSite { name: name.clone(), url: p.url.clone(), pid: p.child.id() })
            .collect(),
    };
    let path = data.join("dev.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&state)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    label: String,
    child: Child,
    url: String,
    /// The arguments it was started with, for a restart.
    args: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within 10 s: killing it", self.label);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `atoll ARGS`, forwards its log lines prefixed with `label`, and waits for the
/// "listening on URL" line.
fn spawn(label: &str, args: &[String]) -> Result<Proc> {
    let exe = std::env::current_exe().context("cannot find the atoll binary")?;
    let mut command = Command::new(exe);
    command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Its own process group: Ctrl-C reaches `atoll dev` only, which stops the children in
        // order (a child that exits first would look like a crash).
        command.process_group(0);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Stop with `atoll dev`, however it ends. Killed, not asked: a graceful stop would
                // hold the port and the data dir a while longer, and a site is built to survive a
                // SIGKILL (Ctrl-C still stops the children gracefully, one by one).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // `atoll dev` died before the line above: nobody would kill this child.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("atoll dev is gone"));
                }
                Ok(())
            });
        }
    }
    let mut child = command.spawn().with_context(|| format!("cannot start {label}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    forward_lines(label.to_owned(), stderr);
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = label.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match line.split("listening on ").nth(1) {
                Some(url) => {
                    let _ = tx.send(url.trim().to_owned());
                }
                None => println!("[{prefix}] {line}"),
            }
        }
    });
    let mut proc = Proc { label: label.to_owned(), child, url: String::new(), args: args.to_vec() };
    proc.url = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => url,
        Err(_) => bail!("{label} did not start (see its log lines above)"),
    };
    Ok(proc)
}

fn forward_lines(label: String, from: impl Read + Send + 'static) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            eprintln!("[{label}] {line}");
        }
    });
}

/// `REGION-N` names for the regions, numbering repeats.
fn site_names(regions: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for (i, region) in regions.iter().enumerate() {
        let n = regions[..i].iter().filter(|r| *r == region).count() + 1;
        names.push(format!("{region}-{n}"));
    }
    names
}

fn address(base: SocketAddr, offset: usize) -> Result<SocketAddr> {
    if base.port() == 0 {
        return Ok(base);
    }
    let port =
        u16::try_from(base.port() as usize + offset).ok().context("--listen port too high for the sites")?;
    Ok(SocketAddr::new(base.ip(), port))
}

/// Waits (up to 15 s) until the router's port and the sites' are free: the sites of an `atoll
/// dev` that was killed stop when it dies (PR_SET_PDEATHSIG), but take a moment to, and hold
/// their ports and data dirs until they have.
fn wait_for_ports(listen: SocketAddr, sites: usize) -> Result<()> {
    if listen.port() == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 0..=sites {
        let addr = address(listen, i)?;
        let mut told = false;
        while std::net::TcpListener::bind(addr).is_err() {
            if Instant::now() > deadline {
                bail!("{addr} is in use: stop what listens there, or give --listen another port");
            }
            if !told {
                eprintln!("waiting for {addr} to be free (a previous atoll dev's site still stopping?)");
                told = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

pub fn run(args: DevArgs) -> Result<()> {
    if let Some(action) = args.action {
        return rehearse::act(action);
    }
    if args.deploy.len() != args.apps.len() {
        bail!(
            "give each --deploy FILE an --app NAME ({} files, {} names)",
            args.deploy.len(),
            args.apps.len()
        );
    }
    if args.sites.is_empty() || args.sites.iter().any(|r| r.trim().is_empty()) {
        bail!("--sites needs at least one region, e.g. --sites us-east,eu-west");
    }
    for file in &args.deploy {
        if !file.is_file() {
            bail!("--deploy {}: no such file", file.display());
        }
    }
    // Refuse a bad file or override before starting anything; then every child gets both.
    crate::config::FileConfig::load_with(args.config.as_deref(), &args.sets, std::env::vars())?;
    let mut config: Vec<String> = match &args.config {
        Some(path) => vec!["--config".into(), path.display().to_string()],
        None => vec![],
    };
    for set in &args.sets {
        config.extend(["--set".into(), set.clone()]);
    }

    let names = site_names(&args.sites);
    wait_for_ports(args.listen, names.len())?;
    // A new dev cluster starts with no injected faults; its sites read the file as it changes.
    std::fs::create_dir_all(&args.data).with_context(|| format!("cannot create {}", args.data.display()))?;
    let faults = rehearse::faults_file(&args.data);
    let _ = std::fs::remove_file(&faults);
    let mut sites: Vec<(String, String, Proc)> = Vec::new();
    for (i, (name, region)) in names.iter().zip(&args.sites).enumerate() {
        let data = args.data.join(name);
        let mut site_args: Vec<String> = ["site", "--name", name, "--region", region, "--insecure-dev"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        site_args.extend(["--listen".into(), address(args.listen, i + 1)?.to_string()]);
        site_args.extend(["--data".into(), data.display().to_string()]);
        site_args.extend(["--dev-faults".into(), faults.display().to_string()]);
        // Every site is given every earlier one; membership spreads the rest.
        for (_, _, earlier) in &sites {
            site_args.extend(["--peer".into(), earlier.url.clone()]);
        }
        site_args.extend(config.iter().cloned());
        let proc = spawn(name, &site_args)?;
        sites.push((name.clone(), region.clone(), proc));
    }
    let mut router_args: Vec<String> =
        ["router", "--name", "dev-router", "--listen"].map(str::to_owned).to_vec();
    router_args.push(args.listen.to_string());
    for (_, _, site) in &sites {
        router_args.extend(["--site".into(), site.url.clone()]);
    }
    router_args.extend(config.iter().cloned());
    let mut router = spawn("router", &router_args)?;

    let token = std::env::var("ATOLL_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
    for (file, app) in args.deploy.iter().zip(&args.apps) {
        let client = ClientArgs::plain(sites[0].2.url.clone(), token.clone());
        let deploy = DeployArgs {
            client,
            app: app.clone(),
            file: file.clone(),
            deadline_ms: None,
            memory_mb: None,
            allow_hosts: vec![],
            kv_stores: vec![],
            vars: vec![],
            var_files: vec![],
            session_cookie: false,
            stale_reads: None,
        };
        crate::client::deploy(&deploy)?;
    }
    wait_until_deployed(&sites, &args.apps, token.as_deref())?;
    wait_until_in_rotation(&sites, &router, token.as_deref())?;

    for (name, _, _) in &sites {
        let _ = std::fs::remove_file(stopped_marker(&args.data, name));
    }
    write_state(&args.data, &sites)?;
    print_table(&sites, &router, &args.apps, &args.data);
    let restart_after = (args.restart_after_s > 0).then(|| Duration::from_secs(args.restart_after_s));
    if let Some(scenario) = &args.scenario {
        // Checked before anything runs for long.
        crate::drill::parse_scenario(
            &std::fs::read_to_string(scenario)
                .with_context(|| format!("cannot read {}", scenario.display()))?,
        )?;
        let app = args
            .apps
            .first()
            .cloned()
            .context("--scenario needs an --app that counts (e.g. the counter example)")?;
        let drill =
            crate::drill::DrillArgs::for_dev(router.url.clone(), scenario.clone(), args.data.clone(), app);
        // The drill's steps kill and restart sites: atoll dev keeps watching its children meanwhile.
        let report = std::thread::spawn(move || crate::drill::drill(&drill));
        match wait_for_stop_or_exit(&mut sites, &mut router, restart_after, &args.data, &|| {
            report.is_finished()
        })? {
            Ended::Done => match report.join() {
                Ok(Ok(report)) => crate::drill::print(&report),
                Ok(Err(e)) => eprintln!("the drill failed: {e:#}"),
                Err(_) => eprintln!("the drill failed"),
            },
            Ended::Signal => {
                println!("atoll dev stopped during the drill; every site and the router have exited");
                return Ok(());
            }
            Ended::Exited(which) => bail!("{which} exited on its own during the drill; stopped the others"),
        }
    }
    let stopped = wait_for_stop_or_exit(&mut sites, &mut router, restart_after, &args.data, &|| false)?;
    drop(router);
    drop(sites);
    match stopped {
        Ended::Signal | Ended::Done => {
            println!("atoll dev stopped; every site and the router have exited");
            Ok(())
        }
        Ended::Exited(which) => bail!("{which} exited on its own; stopped the others"),
    }
}

/// Waits until every site serves every app deployed at the first (deploys replicate).
fn wait_until_deployed(sites: &[(String, String, Proc)], apps: &[String], token: Option<&str>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for (name, _, site) in sites {
        let client = ClientArgs::plain(site.url.clone(), token.map(str::to_owned));
        for app in apps {
            while !crate::client::is_deployed(&client, app)? {
                if Instant::now() > deadline {
                    bail!("{app} did not replicate to {name} within 60 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

/// Waits until every site is ready (its first sync done) and the router has heard from each and
/// sends each site's region to it, so that what the table promises holds from its first line
/// (a region the router's table does not know is served by whichever site is nearest to the
/// default region: only its site's readiness is waited for).
fn wait_until_in_rotation(
    sites: &[(String, String, Proc)],
    router: &Proc,
    token: Option<&str>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let args = |url: &str| ClientArgs::plain(url.to_owned(), token.map(str::to_owned));
    loop {
        let ready = sites.iter().all(|(_, _, site)| {
            crate::client::get_json(&args(&site.url), "/_atoll/health?ready=1").is_some()
        });
        let routed = ready
            && crate::client::get_json(&args(&router.url), "/_atoll/router/status").is_some_and(|status| {
                let heard = |name: &str| {
                    status["sites"].as_array().is_some_and(|all| {
                        all.iter()
                            .any(|s| s["name"] == name && s["live"] == true && !s["last_ok_ms"].is_null())
                    })
                };
                // Each region served by a site of that region (two sites of one region: the router
                // picks one of them).
                sites.iter().all(|(name, region, _)| {
                    let serving = &status["table"][region.as_str()]["serving"];
                    let unknown_region = status["table"][region.as_str()].is_null();
                    let own = sites.iter().any(|(other, r, _)| r == region && serving == other.as_str());
                    heard(name) && (unknown_region || own)
                })
            });
        if routed {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the sites were not all ready and in the router's rotation within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_table(sites: &[(String, String, Proc)], router: &Proc, apps: &[String], data: &Path) {
    println!();
    println!("  {:<14} {:<12} {:<8} URL", "SITE", "REGION", "PID");
    for (name, region, site) in sites {
        println!("  {name:<14} {region:<12} {:<8} {}", site.child.id(), site.url);
    }
    println!("  {:<14} {:<12} {:<8} {}", "router", "", router.child.id(), router.url);
    println!("\nData in {}. The router sends each request to the nearest live site:", data.display());
    let app = apps.first().map(String::as_str).unwrap_or("NAME");
    for (_, region, _) in sites {
        println!("  curl -i -H 'x-atoll-region: {region}' {}/apps/{app}/", router.url);
    }
    if apps.len() > 1 {
        println!("  (also deployed: {}; call them as {}/apps/NAME/...)", apps[1..].join(", "), router.url);
    }
    println!("  curl {}/_atoll/router/status            # the live routing table", router.url);
    if let Some((_, _, first)) = sites.first() {
        let far = sites.last().map_or("ap-south", |s| s.1.as_str());
        println!(
            "  curl -i -H 'x-atoll-region: {far}' {}/apps/{app}/   # every site forwards too",
            first.url
        );
    }
    if apps.is_empty() {
        println!("  atoll deploy --site {} --app NAME FILE.wasm", router.url);
    }
    println!("atoll dev is ready; Ctrl-C stops everything.");
}

/// Returns `None` on Ctrl-C/SIGTERM, or the label of a child that exited by itself and was not
/// restarted. A site that dies is restarted after `restart_after` (on the same address and data
/// dir: it catches up on what it missed); the router dying stops everything.
/// Why [`wait_for_stop_or_exit`] returned.
enum Ended {
    /// Ctrl-C or SIGTERM.
    Signal,
    /// A child exited for good (named).
    Exited(String),
    /// `done` said so.
    Done,
}

/// Restarts sites that die (after `restart_after`) until a signal, a child that exits for good,
/// or `done`.
fn wait_for_stop_or_exit(
    sites: &mut [(String, String, Proc)],
    router: &mut Proc,
    restart_after: Option<Duration>,
    data: &Path,
    done: &dyn Fn() -> bool,
) -> Result<Ended> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            rt.block_on(crate::shutdown_signal());
        }
        let _ = tx.send(());
    });
    let mut dead: Vec<Option<Instant>> = vec![None; sites.len()];
    loop {
        if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
            return Ok(Ended::Signal);
        }
        if done() {
            return Ok(Ended::Done);
        }
        if let Some(status) = router.child.try_wait()? {
            return Ok(Ended::Exited(format!("the router ({status})")));
        }
        let mut changed = false;
        for ((name, _, site), dead) in sites.iter_mut().zip(&mut dead) {
            match dead {
                None => {
                    let Some(status) = site.child.try_wait()? else { continue };
                    if stopped_marker(data, name).exists() {
                        println!(
                            "{name} stopped ({status}); the router fails its traffic over until `atoll dev start {name}`"
                        );
                        // Restarted once the marker is gone.
                        *dead = Some(Instant::now() + Duration::from_millis(200));
                        continue;
                    }
                    let Some(delay) = restart_after else {
                        return Ok(Ended::Exited(format!("{name} ({status})")));
                    };
                    println!(
                        "{name} exited ({status}); the router fails its traffic over; restarting it in {delay:?}"
                    );
                    *dead = Some(Instant::now() + delay);
                }
                Some(at) if Instant::now() >= *at && !stopped_marker(data, name).exists() => {
                    // The same address, so the router and the peers find it where it was.
                    let mut args = site.args.clone();
                    if let Some(i) = args.iter().position(|a| a == "--listen") {
                        args[i + 1] = site.url.trim_start_matches("http://").to_owned();
                    }
                    let restarted = spawn(name, &args)?;
                    println!("{name} restarted at {}; it catches up on the writes it missed", restarted.url);
                    *site = restarted;
                    *dead = None;
                    changed = true;
                }
                Some(_) => {}
            }
        }
        if changed {
            write_state(data, sites)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_number_repeated_regions() {
        let regions: Vec<String> = ["us-east", "eu-west", "us-east"].map(String::from).to_vec();
        assert_eq!(site_names(&regions), ["us-east-1", "eu-west-1", "us-east-2"]);
    }

    #[test]
    fn ports_follow_the_router_unless_zero() {
        let base: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        assert_eq!(address(base, 2).expect("ok").port(), 8082);
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert_eq!(address(any, 2).expect("ok").port(), 0);
    }
}
