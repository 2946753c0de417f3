//! Deploy replication: which version each app runs is replicated state like any other key.
//!
//! Each app's [`AppRecord`] (version hash, size, settings) is a JSON value in the reserved
//! key-value namespace `_atoll`/`apps` (no guest can name it: app names are DNS labels), so it
//! replicates, merges (last writer wins) and is deleted (tombstones) exactly like handler data.
//! The component bytes travel separately, by version, from any peer that has them
//! (`GET /_atoll/sync/blobs/{version}`, checked against the hash): each site fetches and compiles
//! a version once. [`apply`] makes the registry and the app table match the record; it runs after
//! a local upload or delete, on every replicated change of a record, and at startup.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use atoll_kv::{Namespace, Origin, Write};
use atoll_sync::Node;
use atoll_sync::http::HttpTransport;

use super::{Deployed, Site};
use crate::registry::AppRecord;

fn namespace(site: &Site) -> Result<Namespace> {
    Ok(Namespace::new("_atoll", "apps", site.kv.bounds())?)
}

/// Records the app's new version (or its deletion) in the replicated namespace.
pub(crate) async fn publish(site: &Site, name: &str, record: Option<&AppRecord>) -> Result<()> {
    let write = match record {
        Some(r) => Write::Set(serde_json::to_vec(r)?),
        None => Write::Delete,
    };
    site.kv.write(&namespace(site)?, name.as_bytes(), write).await.context("cannot record the deploy")?;
    Ok(())
}

/// The replicated record of `name`, if it has one.
fn record(site: &Site, name: &str) -> Result<Option<AppRecord>> {
    let Some(bytes) = site.kv.get(&namespace(site)?, name.as_bytes())? else { return Ok(None) };
    Ok(Some(
        serde_json::from_slice(&bytes)
            .with_context(|| format!("app {name}'s replicated record is corrupt"))?,
    ))
}

/// Makes this site serve what the replicated record of `name` says, fetching the component from
/// a peer when this site does not have it. Holds the admin lock while it changes anything.
pub(crate) async fn apply(
    site: &Arc<Site>,
    name: &str,
    peers: Option<(&Node<atoll_kv::Store>, &HttpTransport)>,
) -> Result<()> {
    let _guard = site.admin_lock.lock().await;
    let wanted = record(site, name)?;
    let current = site.apps.read().unwrap_or_else(|e| e.into_inner()).get(name).map(|d| d.record.clone());
    if current == wanted {
        return Ok(());
    }
    let Some(record) = wanted else {
        let (s, n) = (site.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || s.registry.delete(&n)).await??;
        let removed = site.apps.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        super::admin::forget_if_unused(site, removed);
        tracing::info!(app = %name, "deleted (replicated)");
        return Ok(());
    };
    let wasm = match site.registry.component(&record.version)? {
        Some(wasm) => wasm,
        None => fetch(name, &record.version, peers).await?,
    };
    let app = {
        let (runtime, n, w, settings) =
            (site.runtime.clone(), name.to_owned(), wasm.clone(), (&record.settings).into());
        tokio::task::spawn_blocking(move || runtime.load(&n, &w, settings)).await??
    };
    {
        let (s, n, r) = (site.clone(), name.to_owned(), record.clone());
        tokio::task::spawn_blocking(move || s.registry.put(&n, &r, &wasm)).await??;
    }
    let previous = site
        .apps
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_owned(), Deployed { app, record: record.clone() });
    super::admin::forget_if_unused(site, previous);
    tracing::info!(app = %name, version = %record.version, "deployed (replicated)");
    Ok(())
}

async fn fetch(
    name: &str,
    version: &str,
    peers: Option<(&Node<atoll_kv::Store>, &HttpTransport)>,
) -> Result<Vec<u8>> {
    let Some((node, transport)) = peers else {
        anyhow::bail!(
            "app {name} version {version} is not stored here and there are no peers to fetch it from"
        )
    };
    let mut errors = Vec::new();
    for url in node.active_peers() {
        match transport.fetch_blob(&url, version).await {
            Ok(wasm) => return Ok(wasm),
            Err(e) => errors.push(format!("{url}: {e:#}")),
        }
    }
    anyhow::bail!("no peer could send app {name} version {version}: {}", errors.join("; "))
}

/// At startup: once per data dir, records apps deployed before deploys replicated (a registry
/// without records); then applies every record, and removes apps that have none (finishing what
/// a crash interrupted, or a resync dropped).
pub(crate) async fn startup(site: &Arc<Site>) -> Result<()> {
    let ns = namespace(site)?;
    if site.kv.meta("deploy_records")?.is_none() {
        let registered: Vec<(String, AppRecord)> = site
            .apps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, d)| (n.clone(), d.record.clone()))
            .collect();
        for (name, record) in registered {
            if site.kv.entries_at(&[ns.key(name.as_bytes())])?.is_empty() {
                publish(site, &name, Some(&record)).await?;
            }
        }
        site.kv.set_meta("deploy_records", b"1")?;
    }
    for name in all_names(site) {
        if let Err(e) = apply(site, &name, None).await {
            tracing::warn!(app = %name, "cannot apply the deploy record yet: {e:#}");
        }
    }
    Ok(())
}

/// Serves components by version to peers.
pub(crate) struct Blobs(pub(crate) Arc<Site>);

impl atoll_sync::http::Blobs for Blobs {
    fn blob(&self, version: &str) -> Option<Vec<u8>> {
        self.0.registry.component(version).ok().flatten()
    }
}

/// Follows replicated changes of deploy records and applies them; a record whose component
/// cannot be fetched yet is retried every two seconds, and every 30 s every app is checked
/// against its record (a resync drops records without publishing changes).
pub(crate) async fn watch(site: Arc<Site>, node: Arc<Node<atoll_kv::Store>>, transport: Arc<HttpTransport>) {
    let mut changes = site.kv.changes();
    // Records startup could not apply (their component was not here) are retried with peers.
    let mut pending = all_names(&site);
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    let mut sweep = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            batch = changes.recv() => match batch {
                Ok(batch) => {
                    for change in batch.iter().filter(|c| c.origin == Origin::Merged) {
                        if let Some((ns, key)) = Namespace::split(&change.key)
                            && ns.app() == "_atoll" && ns.bucket() == "apps"
                        {
                            pending.insert(String::from_utf8_lossy(key).into_owned());
                        }
                    }
                }
                // Missed changes: check every record.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => pending.extend(all_names(&site)),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = retry.tick() => {}
            _ = sweep.tick() => pending.extend(all_names(&site)),
        }
        for name in std::mem::take(&mut pending) {
            if let Err(e) = apply(&site, &name, Some((&node, &transport))).await {
                tracing::warn!(app = %name, "cannot apply a replicated deploy yet: {e:#}");
                pending.insert(name);
            }
        }
    }
}

/// Every app with a record, and every app deployed here (with a record or not).
fn all_names(site: &Site) -> BTreeSet<String> {
    let names = namespace(site).and_then(|ns| Ok(site.kv.list_keys(&ns, None, site.kv.bounds().max_page)?.0));
    let mut all: BTreeSet<String> =
        names.unwrap_or_default().into_iter().map(|n| String::from_utf8_lossy(&n).into_owned()).collect();
    all.extend(site.apps.read().unwrap_or_else(|e| e.into_inner()).keys().cloned());
    all
}
