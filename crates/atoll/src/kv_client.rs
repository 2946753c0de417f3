//! `atoll kv`: an app's key-value data from the command line, through a site's admin API
//! (`/_atoll/apps/NAME/kv/...`, see `site/kvapi.rs`). Values are printed raw (`get`) or as a
//! total (`incr`); `--json` prints what the site holds: the stamp, the answering site, a
//! counter's parts per writer, and how fresh the site's data is.

use std::io::{IsTerminal, Read, Write as _};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::ClientArgs;
use crate::client::Site;

#[derive(Debug, Args)]
pub(crate) struct KvArgs {
    #[command(subcommand)]
    op: KvOp,
}

#[derive(Debug, Subcommand)]
enum KvOp {
    /// Print a key's value (its bytes as stored; a counter's total in decimal).
    Get {
        #[command(flatten)]
        at: Target,
        key: String,
    },
    /// Set a key: to VALUE, to a file's bytes (--file), or to stdin's (neither, or VALUE `-`).
    Set {
        #[command(flatten)]
        at: Target,
        key: String,
        value: Option<String>,
        /// Take the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
    },
    /// Delete a key (a tombstone that replicates).
    Delete {
        #[command(flatten)]
        at: Target,
        key: String,
    },
    /// Add to a counter (by 1, or --by N; negative to subtract) and print its new total.
    Incr {
        #[command(flatten)]
        at: Target,
        key: String,
        #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
        by: i64,
    },
    /// List keys, one per line, in key order (all of them, or one page with --limit).
    List {
        #[command(flatten)]
        at: Target,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// One page of at most this many keys (the site caps a page at 1000); the cursor of the
        /// next page goes to stderr (or `next` with --json).
        #[arg(long)]
        limit: Option<usize>,
        /// Start after this key (a page's cursor).
        #[arg(long)]
        after: Option<String>,
    },
}

#[derive(Debug, Args)]
struct Target {
    #[command(flatten)]
    client: ClientArgs,
    /// The app whose data it is.
    #[arg(long)]
    app: String,
    /// The bucket (what the guest opens: `default` for Spin's default store and `""`).
    #[arg(long, default_value = "default")]
    bucket: String,
    /// Print the site's answer as JSON: value, stamp, site, counter parts, freshness.
    #[arg(long)]
    json: bool,
}

impl Target {
    fn url(&self, site: &Site, key: Option<&str>) -> String {
        match key {
            Some(key) => site.url(&format!("/_atoll/apps/{}/kv/{}", self.app, encode(key))),
            None => site.url(&format!("/_atoll/apps/{}/kv", self.app)),
        }
    }
}

/// Percent-encodes every byte of a key but the unreserved ones (RFC 3986), `/` included.
fn encode(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) fn run(args: &KvArgs) -> Result<()> {
    match &args.op {
        KvOp::Get { at, key } => {
            let site = Site::new(&at.client)?;
            let mut request = site.agent.get(at.url(&site, Some(key))).query("bucket", &at.bucket);
            if at.json {
                request = request.query("format", "json");
            }
            let body = site.check_bytes(&format!("reading {key:?}"), site.auth(request).call())?;
            std::io::stdout().write_all(&body)?;
            if at.json {
                println!();
            } else if std::io::stderr().is_terminal() {
                freshness(&site, at);
            }
            Ok(())
        }
        KvOp::Set { at, key, value, file } => {
            let bytes = match (value.as_deref(), file) {
                (_, Some(path)) => {
                    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
                }
                (Some(v), None) if v != "-" => v.as_bytes().to_vec(),
                _ => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf).context("cannot read the value from stdin")?;
                    buf
                }
            };
            let site = Site::new(&at.client)?;
            let request = site.agent.put(at.url(&site, Some(key))).query("bucket", &at.bucket);
            let body = site.check(&format!("setting {key:?}"), site.auth(request).send(&bytes[..]))?;
            written(at, &body, &format!("set {key:?} ({} bytes)", bytes.len()))
        }
        KvOp::Delete { at, key } => {
            let site = Site::new(&at.client)?;
            let request = site.agent.delete(at.url(&site, Some(key))).query("bucket", &at.bucket);
            let body = site.check(&format!("deleting {key:?}"), site.auth(request).call())?;
            written(at, &body, &format!("deleted {key:?}"))
        }
        KvOp::Incr { at, key, by } => {
            let site = Site::new(&at.client)?;
            let request = site
                .agent
                .post(at.url(&site, Some(key)))
                .query("bucket", &at.bucket)
                .query("by", by.to_string());
            let body = site.check(&format!("incrementing {key:?}"), site.auth(request).send_empty())?;
            if at.json {
                println!("{body}");
            } else {
                let shown: serde_json::Value = serde_json::from_str(&body).context("unexpected answer")?;
                println!("{}", shown["value"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        KvOp::List { at, prefix, limit, after } => list(at, prefix, *limit, after.clone()),
    }
}

/// Prints a write's answer: the site's JSON with --json, else a line on stderr.
fn written(at: &Target, body: &str, what: &str) -> Result<()> {
    if at.json {
        println!("{body}");
        return Ok(());
    }
    let shown: serde_json::Value = serde_json::from_str(body).context("unexpected answer")?;
    eprintln!(
        "{what} in {}/{} at {} (stamp {} by {})",
        at.app,
        shown["bucket"].as_str().unwrap_or_default(),
        shown["site"].as_str().unwrap_or_default(),
        shown["stamp"]["hlc"].as_str().unwrap_or_default(),
        shown["stamp"]["writer"].as_str().unwrap_or_default()
    );
    Ok(())
}

fn list(at: &Target, prefix: &str, limit: Option<usize>, mut after: Option<String>) -> Result<()> {
    let site = Site::new(&at.client)?;
    let mut all = Vec::new();
    loop {
        let mut request =
            site.agent.get(at.url(&site, None)).query("bucket", &at.bucket).query("prefix", prefix);
        if let Some(limit) = limit {
            request = request.query("limit", limit.to_string());
        }
        if let Some(after) = &after {
            request = request.query("after", after);
        }
        let body = site.check("listing keys", site.auth(request).call())?;
        let page: serde_json::Value = serde_json::from_str(&body).context("unexpected answer")?;
        let keys = page["keys"].as_array().cloned().unwrap_or_default();
        let next = page["next"].as_str().map(str::to_owned);
        if !at.json {
            let mut out = std::io::stdout().lock();
            for key in &keys {
                writeln!(out, "{}", key.as_str().unwrap_or_default())?;
            }
        }
        all.extend(keys);
        match next {
            Some(cursor) if limit.is_none() => {
                if after.as_deref() == Some(cursor.as_str()) {
                    bail!("the site returned the same page twice (cursor {cursor:?})");
                }
                after = Some(cursor);
            }
            next => {
                if at.json {
                    let mut last = page;
                    last["keys"] = serde_json::Value::Array(all);
                    println!("{last}");
                } else if let Some(cursor) = next {
                    eprintln!("more keys: --after {cursor:?}");
                }
                return Ok(());
            }
        }
    }
}

/// One line on stderr: which site answered and how far behind its peers it may be.
fn freshness(site: &Site, at: &Target) {
    let url = at.url(site, None);
    let Ok(body) =
        site.check("", site.auth(site.agent.get(url).query("bucket", &at.bucket).query("limit", "1")).call())
    else {
        return;
    };
    let Ok(page) = serde_json::from_str::<serde_json::Value>(&body) else { return };
    let peers: Vec<String> = page["freshness"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| match p["lag_ms"].as_u64() {
            Some(lag) => format!("{} {lag} ms", p["site"].as_str().unwrap_or("?")),
            None => format!("{} unknown", p["site"].as_str().unwrap_or("?")),
        })
        .collect();
    let lag = if peers.is_empty() {
        "no peers".to_owned()
    } else {
        format!("replication lag {}", peers.join(", "))
    };
    eprintln!("(answered by {}; {lag})", page["site"].as_str().unwrap_or("?"));
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_encoded_whole() {
        assert_eq!(super::encode("user:1/ä b"), "user%3A1%2F%C3%A4%20b");
        assert_eq!(super::encode("plain-key_1.~"), "plain-key_1.~");
    }
}
