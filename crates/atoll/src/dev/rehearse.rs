//! Rehearsing failures on a running `atoll dev` (found through `DATA/dev.json`): a site killed,
//! stopped and started again; a partition between sites, latency, a clock skew, injected into
//! the sites' own transports through `DATA/faults.json` (see `site::faults`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::site::faults::{Cut, FaultsFile, SiteFaults};

/// A failure to rehearse on a running `atoll dev` (found through `DATA/dev.json`).
#[derive(Debug, clap::Subcommand)]
pub(super) enum Action {
    /// SIGKILL the site (a crash): `atoll dev` restarts it after --restart-after-s.
    Kill(Target),
    /// Stop the site (SIGTERM, a clean stop) and keep it stopped until `atoll dev start`.
    Stop(Target),
    /// Start a site stopped by `atoll dev stop`.
    Start(Target),
    /// Cut sites off from the others (replication and forwarding between them fail; clients
    /// still reach every site), until `atoll dev heal`.
    Partition(PartitionArgs),
    /// End every injected fault: partitions, latency and clock skew.
    Heal(Cluster),
    /// Add latency to a site: every replication message it sends and every app request it
    /// serves waits SITE=MS first (0 ends it).
    Latency(Setting),
    /// Move a site's clock: SITE=+MS or SITE=-MS (0 ends it). Past the clock bound
    /// (`[sync] max_clock_offset_ms`) its peers flag it and it refuses guest writes.
    Skew(Setting),
}

#[derive(Debug, Args)]
pub(super) struct Target {
    /// The site, as the table names it (`eu-west-1`).
    site: String,
    #[command(flatten)]
    cluster: Cluster,
}

#[derive(Debug, Args)]
pub(super) struct Cluster {
    /// The data directory of the running `atoll dev`.
    #[arg(long, default_value = ".atoll/dev")]
    data: PathBuf,
}

#[derive(Debug, Args)]
pub(super) struct PartitionArgs {
    /// The sites on one side, comma-separated.
    sites: String,
    /// The sites on the other side, comma-separated (default: every other site).
    #[arg(long)]
    from: Option<String>,
    #[command(flatten)]
    cluster: Cluster,
}

#[derive(Debug, Args)]
pub(super) struct Setting {
    /// SITE=VALUE, e.g. eu-west-1=200.
    #[arg(allow_hyphen_values = true)]
    setting: String,
    #[command(flatten)]
    cluster: Cluster,
}

/// What a running `atoll dev` is, in `DATA/dev.json` (rewritten when a site restarts).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct State {
    pub(super) pid: u32,
    pub(super) sites: Vec<StateSite>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct StateSite {
    pub(super) name: String,
    pub(super) url: String,
    pub(super) pid: u32,
}

impl State {
    /// The running `atoll dev` whose data dir is `data`.
    fn running(data: &Path) -> Result<State> {
        let path = data.join("dev.json");
        let state: State =
            std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).with_context(
                || format!("no running atoll dev with --data {} (no {})", data.display(), path.display()),
            )?;
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        if unsafe { libc::kill(state.pid as libc::pid_t, 0) } != 0 {
            bail!("the atoll dev that wrote {} (pid {}) is not running", path.display(), state.pid);
        }
        Ok(state)
    }

    fn site(&self, name: &str) -> Result<&StateSite> {
        self.sites.iter().find(|s| s.name == name).with_context(|| {
            let names: Vec<&str> = self.sites.iter().map(|s| s.name.as_str()).collect();
            format!("no site {name:?} in this atoll dev (its sites: {})", names.join(", "))
        })
    }
}

/// The marker that keeps a site stopped (`atoll dev stop`) until `atoll dev start` removes it.
pub(super) fn stopped_marker(data: &Path, site: &str) -> PathBuf {
    data.join(format!("{site}.stopped"))
}

/// Where a dev cluster's injected faults are (read by its sites: `--dev-faults`).
pub(super) fn faults_file(data: &Path) -> PathBuf {
    data.join("faults.json")
}

/// `atoll dev kill|stop|start|partition|heal|latency|skew`.
pub(super) fn act(action: Action) -> Result<()> {
    enum Life {
        Kill,
        Stop,
        Start,
    }
    let (target, life) = match action {
        Action::Kill(t) => (t, Life::Kill),
        Action::Stop(t) => (t, Life::Stop),
        Action::Start(t) => (t, Life::Start),
        Action::Partition(args) => return partition(&args),
        Action::Heal(cluster) => {
            let state = State::running(&cluster.data)?;
            inject(&cluster.data, &state, |file| file.sites.clear())?;
            println!("healed: no fault is injected any more");
            return Ok(());
        }
        Action::Latency(s) => return setting(&s, "latency", |f, v: u64| f.latency_ms = v),
        Action::Skew(s) => return setting(&s, "skew", |f, v: i64| f.skew_ms = v),
    };
    let data = &target.cluster.data;
    let state = State::running(data)?;
    let site = state.site(&target.site)?;
    let marker = stopped_marker(data, &site.name);
    // Only a process that is still that atoll dev's child is signalled (a pid of a site that has
    // exited may belong to another process by now).
    let running = parent_of(site.pid) == Some(state.pid);
    let signal = |sig: libc::c_int| -> Result<()> {
        if !running {
            bail!("{} is not running (stopped, or being restarted)", site.name);
        }
        // SAFETY: kill(2) on a child of the running atoll dev, checked just above.
        unsafe { libc::kill(site.pid as libc::pid_t, sig) };
        Ok(())
    };
    match life {
        Life::Kill => {
            signal(libc::SIGKILL)?;
            println!(
                "killed {} (pid {}); atoll dev restarts it after --restart-after-s",
                site.name, site.pid
            );
        }
        Life::Stop => {
            if marker.exists() || !running {
                bail!("{} is not running (stopped already, or being restarted)", site.name);
            }
            std::fs::write(&marker, b"").with_context(|| format!("cannot write {}", marker.display()))?;
            signal(libc::SIGTERM)?;
            println!(
                "stopping {} (pid {}); `atoll dev start {}` starts it again",
                site.name, site.pid, site.name
            );
        }
        Life::Start => {
            if !marker.exists() {
                bail!("{} was not stopped with `atoll dev stop`", site.name);
            }
            std::fs::remove_file(&marker).with_context(|| format!("cannot remove {}", marker.display()))?;
            println!("starting {} again at {}", site.name, site.url);
        }
    }
    Ok(())
}

/// `atoll dev partition SITES [--from SITES]`.
fn partition(args: &PartitionArgs) -> Result<()> {
    let state = State::running(&args.cluster.data)?;
    let list = |text: &str| -> Result<Vec<&StateSite>> {
        text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| state.site(s)).collect()
    };
    let side = list(&args.sites)?;
    if side.is_empty() {
        bail!("name the sites to cut off, e.g. `atoll dev partition eu-west-1`");
    }
    let other: Vec<&StateSite> = match &args.from {
        Some(from) => list(from)?,
        None => state.sites.iter().filter(|s| !side.iter().any(|c| c.name == s.name)).collect(),
    };
    if other.is_empty() || other.iter().any(|o| side.iter().any(|s| s.name == o.name)) {
        bail!("a partition needs sites on both sides, none on both");
    }
    let cut = |s: &StateSite| Cut { site: s.name.clone(), url: s.url.clone() };
    inject(&args.cluster.data, &state, |file| {
        for (from, to) in side.iter().flat_map(|a| other.iter().flat_map(move |b| [(a, b), (b, a)])) {
            let faults = file.sites.entry(from.name.clone()).or_default();
            if !faults.cut_from.iter().any(|c| c.site == to.name) {
                faults.cut_from.push(cut(to));
                faults.cut_from.sort();
            }
        }
    })?;
    let names = |sites: &[&StateSite]| sites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
    println!("partitioned {} from {}; `atoll dev heal` ends it", names(&side), names(&other));
    Ok(())
}

/// `atoll dev latency|skew SITE=VALUE`.
fn setting<V: std::str::FromStr + Default + PartialEq + std::fmt::Display>(
    args: &Setting,
    what: &str,
    set: impl Fn(&mut SiteFaults, V),
) -> Result<()> {
    let state = State::running(&args.cluster.data)?;
    let (name, value) = args.setting.split_once('=').with_context(|| {
        format!("give {what} as SITE=MS, e.g. `atoll dev {what} eu-west-1=200` (0 ends it)")
    })?;
    let site = state.site(name.trim())?;
    let value = value.trim().trim_start_matches('+');
    let value: V = value
        .parse()
        .map_err(|_| anyhow::anyhow!("{what} {value:?} is not a whole number of milliseconds"))?;
    let none = value == V::default();
    let shown = value.to_string();
    inject(&args.cluster.data, &state, |file| {
        let faults = file.sites.entry(site.name.clone()).or_default();
        set(faults, value);
    })?;
    if none {
        println!("{} has no {what} any more", site.name);
    } else {
        println!("{} now has {what} {shown} ms; `atoll dev heal` ends every fault", site.name);
    }
    Ok(())
}

/// Changes the faults file and waits until every site took the change (its health answer
/// shows what it applies), so that what follows the command sees it.
fn inject(data: &Path, state: &State, change: impl FnOnce(&mut FaultsFile)) -> Result<()> {
    let path = faults_file(data);
    let mut file = FaultsFile::load(&path)?;
    change(&mut file);
    file.sites.retain(|_, f| !f.is_empty());
    file.store(&path)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    for site in &state.sites {
        let want = file.sites.get(&site.name).cloned().unwrap_or_default();
        let client = crate::ClientArgs::plain(site.url.clone(), None);
        loop {
            let health = crate::client::get_json(&client, "/_atoll/health");
            let has = health
                .as_ref()
                .map(|h| serde_json::from_value::<SiteFaults>(h["dev_faults"].clone()).unwrap_or_default());
            // A site that does not answer (killed, stopped) reads the file when it starts.
            if has.is_none() || has.as_ref() == Some(&want) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not take the faults within 10 s (was it started by this atoll dev?)",
                    site.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The parent pid of `pid`, from `/proc` (Linux).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}
