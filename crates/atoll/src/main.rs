//! `atoll`: run an edge site, deploy handlers to it, list them.
//!
//! `atoll site` is the server; `deploy`, `apps` and `delete` are clients of a site's admin API.

mod backup;
mod client;
mod config;
mod dev;
mod drill;
mod history;
mod kv_client;
mod listen;
mod metrics;
mod registry;
mod router;
/// Signed deploys live in their own crate (fuzzed there); `crate::signing` names it here.
use atoll_deploy as signing;
mod site;
mod status_cli;
mod tls;
mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

/// Atoll: WebAssembly HTTP handlers at every edge site, with replicated state.
#[derive(Debug, Parser)]
#[command(name = "atoll", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format on stderr: text, or json (one object per line). Filter with RUST_LOG.
    #[arg(long, global = true, env = "ATOLL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one site: serve deployed apps and the admin API.
    Site(SiteArgs),
    /// Run a router: send each request to the nearest live site for its region.
    Router(RouterArgs),
    /// Run several local sites (separate processes, peered) and a router, for development.
    Dev(dev::DevArgs),
    /// Run a failure drill: a client workload through a router while a scenario of faults plays,
    /// then a report (failures per phase, failover, lag, convergence, stale reads, duplicates).
    Drill(drill::DrillArgs),
    /// Upload a component as the new version of an app.
    Deploy(DeployArgs),
    /// List the apps deployed on a site.
    Apps(ClientArgs),
    /// Remove an app from a site.
    Delete(DeleteArgs),
    /// Make a deploy key: the private key into a file, the public key on stdout.
    Keygen(KeygenArgs),
    /// Read and change an app's key-value data at a site: get, set, delete, incr, list.
    Kv(kv_client::KvArgs),
    /// Stream a consistent backup of a live site into a file (`atoll site --seed FILE` starts a
    /// new site from one).
    Backup(backup::BackupArgs),
    /// What a site or router sees: sites live or down, replication, failed-over regions, the
    /// last minute's traffic and the last events (`--json`: the status page's data).
    Status(status_cli::StatusArgs),
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Where to write the private key (must not exist; made readable by its owner only).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct SiteArgs {
    /// This site's name, unique among the sites (shown in `x-atoll-site`).
    #[arg(long, env = "ATOLL_SITE_NAME")]
    name: String,
    /// The region this site runs in (for example us-east).
    #[arg(long, env = "ATOLL_SITE_REGION")]
    region: String,
    /// Address to listen on; port 0 picks a free port (printed on the first line of stdout).
    #[arg(long, env = "ATOLL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve the admin API and replication on this address only, apart from the apps: the
    /// listen address then serves apps, health and the status page, and nothing under
    /// /_atoll/apps or /_atoll/sync. Peers reach this site here (the default advertised URL).
    #[arg(long, env = "ATOLL_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Directory for this site's data (app registry, compiled components).
    #[arg(long, env = "ATOLL_DATA")]
    data: PathBuf,
    /// TOML configuration file (limits, instance pool, admin settings, replication).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base URL of a peer site to replicate with; repeat for more. Sites learn the rest of the
    /// membership from their peers. Listing this site's own URL is harmless.
    #[arg(long = "peer", env = "ATOLL_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// The URL peers reach this site at (default: http://<listen address>).
    #[arg(long, env = "ATOLL_ADVERTISE")]
    advertise: Option<String>,
    /// Override a config field, e.g. --set limits.deadline_ms=2000 (repeatable; also env
    /// ATOLL_SECTION__FIELD=VALUE).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// Serve the admin API without a token when ATOLL_ADMIN_TOKEN is unset, and use a fixed
    /// development peer secret when ATOLL_PEER_SECRET is unset. Local development only.
    #[arg(long)]
    insecure_dev: bool,
    /// Take the faults `atoll dev` injects (partition, latency, clock skew) from this file.
    /// Development only: refused without --insecure-dev and loopback listen addresses.
    #[arg(long, hide = true)]
    dev_faults: Option<PathBuf>,
    /// Start this site from a backup (`atoll backup`) when its data dir holds no store yet; it
    /// then catches up with its peers by anti-entropy. Ignored once seeded (a restart).
    #[arg(long, env = "ATOLL_SEED")]
    seed: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RouterArgs {
    /// Address to listen on; port 0 picks a free port (printed on the first line of stdout).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// TOML configuration file (`[router]`, `[routing]`, `[dns]`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A site to route to: http://HOST:PORT, or srv://NAME for DNS SRV discovery; repeat for more.
    #[arg(long = "site")]
    sites: Vec<String>,
    /// This router's name (default: `[router] name`, else "router").
    #[arg(long)]
    name: Option<String>,
    /// Override a config field, e.g. --set limits.deadline_ms=2000 (repeatable; also env
    /// ATOLL_SECTION__FIELD=VALUE).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// The site's base URL, for example http://127.0.0.1:8080.
    #[arg(long)]
    site: String,
    /// The admin token (default: $ATOLL_ADMIN_TOKEN).
    #[arg(long, env = "ATOLL_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The deploy key file (atoll keygen) to sign the deploy or delete with; without one, the
    /// site signs it if it holds a deploy key itself, and refuses it otherwise.
    #[arg(long, env = "ATOLL_DEPLOY_KEY_FILE")]
    deploy_key: Option<PathBuf>,
    /// The cluster a deploy signed with --deploy-key is for ([admin] cluster of the sites; the
    /// site is asked too, and a mismatch refused). Needed with --deploy-key: a signature says
    /// which cluster it holds in, so it is never taken from the site alone.
    #[arg(long, env = "ATOLL_CLUSTER")]
    cluster: Option<String>,
    /// CA certificates (PEM) to verify an https:// site with (default: the public web roots).
    #[arg(long, env = "ATOLL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) for a site that requires one ([tls] client_auth).
    #[arg(long, env = "ATOLL_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "ATOLL_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The client of a plain-HTTP site (`atoll dev`'s).
    fn plain(site: String, token: Option<String>) -> ClientArgs {
        ClientArgs {
            site,
            token,
            deploy_key: None,
            cluster: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }
}

#[derive(Debug, Args)]
struct DeployArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The app's name: lowercase letters, digits and '-'.
    #[arg(long)]
    app: String,
    /// The component (.wasm) to upload.
    file: PathBuf,
    /// Request deadline in milliseconds (default: the site's).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Linear memory cap in MiB (default: the site's).
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Host (or host:port) the handler may call over wasi:http; repeat for more.
    #[arg(long = "allow-host")]
    allow_hosts: Vec<String>,
    /// A key-value store label the handler may open through Spin's key-value interfaces
    /// besides `default` (like `key_value_stores` in spin.toml); repeat for more.
    #[arg(long = "kv-store")]
    kv_stores: Vec<String>,
    /// A variable the handler reads (Spin's variables, wasi:config), as NAME=VALUE; repeat for
    /// more. Names: lowercase letters, digits and single '_', starting with a letter, ending
    /// with a letter or digit. Overrides the same name in a --var-file.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// A file of variables, one NAME=VALUE per line (the value is the rest of the line, taken
    /// as is; blank lines and lines starting with '#' are skipped); repeat for more (a later
    /// file overrides an earlier one's names).
    #[arg(long = "var-file", value_name = "FILE")]
    var_files: Vec<PathBuf>,
    /// Also carry the session token in a cookie (`atoll-session`), for browsers: reads then
    /// see the client's own writes at any site (see README, "Sessions").
    #[arg(long)]
    session_cookie: bool,
    /// When a site cannot show a session everything it has seen and no site that can is live:
    /// serve (stale, with x-atoll-stale: 1; the default) or refuse (503).
    #[arg(long, value_parser = ["serve", "refuse"])]
    stale_reads: Option<String>,
}

#[derive(Debug, Args)]
struct DeleteArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The app to remove.
    #[arg(long)]
    app: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let result = match cli.command {
        Command::Site(args) => run_site(args),
        Command::Router(args) => run_router(args),
        Command::Dev(args) => dev::run(args),
        Command::Drill(args) => drill::run(args),
        Command::Deploy(args) => client::deploy(&args),
        Command::Apps(args) => client::apps(&args),
        Command::Delete(args) => client::delete(&args),
        Command::Keygen(args) => keygen(&args),
        Command::Kv(args) => kv_client::run(&args),
        Command::Backup(args) => backup::run(&args),
        Command::Status(args) => status_cli::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}

fn keygen(args: &KeygenArgs) -> Result<()> {
    let public = signing::keygen(&args.out)?;
    println!("{public}");
    eprintln!(
        "wrote the deploy key to {}: keep it where you deploy from (atoll deploy --deploy-key FILE).\n\
         Give every site the public key above: [admin] deploy_public_keys = [\"{public}\"]\n\
         (or ATOLL_ADMIN__DEPLOY_PUBLIC_KEYS='[\"{public}\"]').",
        args.out.display()
    );
    Ok(())
}

fn run_router(args: RouterArgs) -> Result<()> {
    let config = config::FileConfig::load_with(args.config.as_deref(), &args.sets, std::env::vars())?;
    router::run(router::RouterOptions { listen: args.listen, name: args.name, sites: args.sites, config })
}

fn run_site(args: SiteArgs) -> Result<()> {
    let admin_token = std::env::var("ATOLL_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
    if admin_token.is_none() && !args.insecure_dev {
        bail!(
            "ATOLL_ADMIN_TOKEN is not set: the admin API needs a bearer token. Set it, or pass \
             --insecure-dev to run without one on a development machine"
        );
    }
    if args.dev_faults.is_some() {
        let loopback =
            args.listen.ip().is_loopback() && args.admin_listen.is_none_or(|a| a.ip().is_loopback());
        if !args.insecure_dev || !loopback {
            bail!(
                "--dev-faults injects failures for `atoll dev` rehearsals only: it needs --insecure-dev \
                 and loopback listen addresses (127.0.0.1), so no production site can have it"
            );
        }
    }
    let config = config::FileConfig::load_with(args.config.as_deref(), &args.sets, std::env::vars())?;
    let mut peers = args.peers;
    peers.extend(config.sync.peers.iter().cloned());
    // During a rotation a site accepts a second admin token and a second peer secret.
    let accepted = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
    let admin_token_accepted = accepted("ATOLL_ADMIN_TOKEN_ACCEPTED");
    if admin_token_accepted.is_some() && admin_token.is_none() {
        bail!("ATOLL_ADMIN_TOKEN_ACCEPTED is set but ATOLL_ADMIN_TOKEN is not");
    }
    if accepted("ATOLL_PEER_SECRET_ACCEPTED").is_some() && accepted("ATOLL_PEER_SECRET").is_none() {
        bail!("ATOLL_PEER_SECRET_ACCEPTED is set but ATOLL_PEER_SECRET is not");
    }
    for name in ["ATOLL_ADMIN_TOKEN_ACCEPTED", "ATOLL_PEER_SECRET_ACCEPTED"] {
        if accepted(name).is_some() {
            tracing::warn!("{name} is set: a second secret is accepted (finish the rotation, then unset it)");
        }
    }
    let peer_secret = match std::env::var("ATOLL_PEER_SECRET").ok().filter(|s| !s.is_empty()) {
        Some(secret) => Some(match accepted("ATOLL_PEER_SECRET_ACCEPTED") {
            Some(other) => atoll_sync::auth::Secret::new(&secret)?.accepting(&other)?,
            None => atoll_sync::auth::Secret::new(&secret)?,
        }),
        None if args.insecure_dev => Some(atoll_sync::auth::Secret::new(site::INSECURE_DEV_PEER_SECRET)?),
        None if !peers.is_empty() => bail!(
            "ATOLL_PEER_SECRET is not set: sites prove it to each other on every sync message. Set the \
             same secret (16 characters or more) on every site, or pass --insecure-dev on a development machine"
        ),
        None => None,
    };
    let trust = signing::Trust::new(
        &config.admin.deploy_public_keys,
        config.admin.deploy_key_file.as_deref(),
        args.insecure_dev,
        config.cluster(),
    )?;
    if peer_secret.is_some() && !trust.configured() {
        bail!(
            "no deploy key: a replicating site runs only deploys signed by a key it trusts. Run \
             `atoll keygen --out deploy.key` and give every site its public key ([admin] \
             deploy_public_keys), or give the sites the key itself ([admin] deploy_key_file) to have \
             them sign what their admin token admits"
        );
    }
    let advertise = args.advertise.or_else(|| config.sync.advertise.clone());
    let options = site::SiteOptions {
        name: args.name,
        region: args.region,
        listen: args.listen,
        dev_faults: args.dev_faults,
        seed: args.seed,
        admin_listen: args.admin_listen,
        data: args.data,
        config,
        admin_token,
        admin_token_accepted,
        peers,
        advertise,
        peer_secret,
        trust,
    };
    site::run(options)
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
