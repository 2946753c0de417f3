//! `atoll status --site URL | --router URL`: what the status page shows, in a terminal: the
//! sites, live or dead, replication per peer, which site serves the regions that failed over,
//! the last minute's traffic and the last events. `--json` prints the page's data as it is.

use anyhow::{Context, Result, bail};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// A site's base URL.
    #[arg(long, conflicts_with = "router", required_unless_present = "router")]
    site: Option<String>,
    /// A router's base URL (sites and routing as it sees them; replication and history as the
    /// site it reports from sees them).
    #[arg(long)]
    router: Option<String>,
    /// The admin token, for sites with `[admin] protect_status` (default: $ATOLL_ADMIN_TOKEN).
    #[arg(long, env = "ATOLL_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificates (PEM) to verify an https:// site with.
    #[arg(long, env = "ATOLL_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Print the status page's data (JSON) instead.
    #[arg(long)]
    json: bool,
    /// How many of the last events to print.
    #[arg(long, default_value_t = 10)]
    events: usize,
}

pub(crate) fn run(args: &StatusArgs) -> Result<()> {
    let url = args.site.clone().or_else(|| args.router.clone()).context("--site or --router is needed")?;
    let client = crate::ClientArgs {
        site: url,
        token: args.token.clone(),
        deploy_key: None,
        cluster: None,
        ca_file: args.ca_file.clone(),
        client_cert: None,
        client_key: None,
    };
    let site = crate::client::Site::new(&client)?;
    let body =
        site.check("reading the status", site.auth(site.agent.get(site.url("/_atoll/ui/state"))).call())?;
    let state: Value = serde_json::from_str(&body).context("the answer is not the status page's data")?;
    if state["sites"].as_array().is_none() {
        bail!("{} did not answer with the status page's data", site.base);
    }
    if args.json {
        println!("{state}");
        return Ok(());
    }
    print!("{}", render(&state, args.events, crate::history::now_ms()));
    Ok(())
}

fn ago(now: u64, t: Option<u64>) -> String {
    match t {
        Some(t) => format!("{:.1} s ago", now.saturating_sub(t) as f64 / 1000.0),
        None => "never".into(),
    }
}

/// The report, as text.
fn render(state: &Value, events: usize, now: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let sites = state["sites"].as_array().cloned().unwrap_or_default();
    let dead = sites.iter().filter(|x| x["live"] != true).count();
    let _ = writeln!(
        out,
        "Atoll {} {}{}: {} sites, {} live, {} down",
        s(&state["kind"]),
        s(&state["name"]),
        state["region"].as_str().map(|r| format!(" (region {r})")).unwrap_or_default(),
        sites.len(),
        sites.len() - dead,
        dead
    );
    let _ = writeln!(out, "\n{:<20} {:<14} {:<22} FAULTS / LAST ERROR", "SITE", "REGION", "STATE");
    for x in &sites {
        let state = if x["live"] == true {
            "live"
        } else if x["cut"] == true {
            "cut off (partition)"
        } else {
            "DOWN"
        };
        let note = x["faults"]
            .as_object()
            .map(|f| Value::Object(f.clone()).to_string())
            .or_else(|| x["last_error"].as_str().map(str::to_owned));
        let _ = writeln!(
            out,
            "{:<20} {:<14} {:<22} {}",
            s(&x["name"]),
            s(&x["region"]),
            state,
            note.unwrap_or_default()
        );
    }
    let peers = state["peers"].as_array().cloned().unwrap_or_default();
    if !peers.is_empty() {
        let by = state["reported_by"].as_str().map(|r| format!(" (as {r} reports it)")).unwrap_or_default();
        let _ = writeln!(out, "\nReplication{by}");
        let _ = writeln!(
            out,
            "{:<20} {:<28} {:>10} {:>14} {:>8}",
            "PEER", "STATE", "LAG", "LAST SYNC", "PENDING"
        );
        for p in &peers {
            let flag = if p["cut_off"] == true {
                "cut off: must resync".to_owned()
            } else if p["must_reincarnate"] == true {
                "older copy: must reincarnate".to_owned()
            } else {
                p["flag"].as_str().unwrap_or("ok").to_owned()
            };
            let lag = p["lag_ms"].as_u64().map_or("-".into(), |l| format!("{l} ms"));
            let _ = writeln!(
                out,
                "{:<20} {:<28} {:>10} {:>14} {:>8}",
                p["site"].as_str().or(p["url"].as_str()).unwrap_or("?"),
                flag,
                lag,
                ago(now, p["last_sync_ms"].as_u64()),
                p["push_pending"].as_u64().unwrap_or(0)
            );
        }
    }
    // Regions not served by their first choice.
    let moved: Vec<String> = state["table"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["serving"] != r["order"][0])
        .map(|r| format!("{} -> {}", s(&r["region"]), r["serving"].as_str().unwrap_or("no live site")))
        .collect();
    if !moved.is_empty() {
        let _ = writeln!(out, "\nRegions not served by their nearest site: {}", moved.join(", "));
    }
    let history = &state["history"];
    let samples: Vec<&Value> = history["samples"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["t"].as_u64().unwrap_or(0) + 60_000 >= now)
        .collect();
    if !samples.is_empty() {
        let sum = |k: &str| samples.iter().filter_map(|x| x[k].as_u64()).sum::<u64>();
        let worst = |k: &str| {
            samples
                .iter()
                .filter_map(|x| x[k].as_f64())
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        };
        let lag: Vec<String> = peers
            .iter()
            .filter_map(|p| p["site"].as_str())
            .filter_map(|name| {
                let most = samples.iter().filter_map(|x| x["peers"][name]["lag_ms"].as_u64()).max()?;
                Some(format!("{name} {most} ms"))
            })
            .collect();
        let _ = writeln!(
            out,
            "\nLast minute: {} requests, {} errors (5xx), worst p99 {}, {} key-value operations{}",
            sum("requests"),
            sum("errors"),
            worst("p99_ms").map_or("-".into(), |v| format!("{v} ms")),
            sum("kv_ops"),
            if lag.is_empty() { String::new() } else { format!(", greatest lag {}", lag.join(", ")) }
        );
    }
    let all: Vec<&Value> = history["events"].as_array().into_iter().flatten().collect();
    if !all.is_empty() {
        let _ = writeln!(out, "\nLast events");
        for e in all.iter().rev().take(events).rev() {
            let t = e["t"].as_u64().unwrap_or(0);
            let _ = writeln!(out, "  {:>10}  {:<9} {}", ago(now, Some(t)), s(&e["kind"]), s(&e["text"]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_report_names_what_is_down_and_what_happened() {
        let state = serde_json::json!({
            "kind": "router", "name": "router",
            "sites": [
                {"name": "us-east-1", "region": "us-east", "live": true},
                {"name": "eu-west-1", "region": "eu-west", "live": false, "last_error": "connection refused"}
            ],
            "table": [{"region": "eu-west", "serving": "us-east-1", "order": ["eu-west-1", "us-east-1"]}],
            "peers": [{"site": "eu-west-1", "lag_ms": 12, "last_sync_ms": 9_000, "push_pending": 3}],
            "reported_by": "us-east-1",
            "history": {
                "samples": [{"t": 9_500, "requests": 7, "errors": 1, "p99_ms": 4.5, "kv_ops": 2, "peers": {"eu-west-1": {"lag_ms": 40}}}],
                "events": [{"t": 9_800, "kind": "down", "text": "eu-west-1 down"}]
            }
        });
        let text = super::render(&state, 10, 10_000);
        for want in [
            "2 sites, 1 live, 1 down",
            "eu-west-1            eu-west        DOWN                   connection refused",
            "Replication (as us-east-1 reports it)",
            "eu-west -> us-east-1",
            "7 requests, 1 errors (5xx), worst p99 4.5 ms, 2 key-value operations, greatest lag eu-west-1 40 ms",
            "0.2 s ago  down      eu-west-1 down",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
    }
}
