//! Deploy replication: which version each app runs is replicated state like any other key.
//!
//! Each app's signed [`DeployRecord`] (version hash, parameters, when and by which deploy key it
//! was signed; a delete is a record too) is a JSON value in the reserved key-value namespace
//! `_atoll`/`apps` (no guest can name it: app names are DNS labels), so it replicates and merges
//! (last writer wins) like handler data. [`admit`] is the door: a record from another site lands
//! in the store only when a trusted deploy key signed it, its name and parameters pass the
//! upload's validation, and it is not older than the one here (see [`crate::signing`]).
//! The component bytes travel separately, by version, from any peer that has them
//! (`GET /_atoll/sync/blobs/{version}`, checked against the hash): each site fetches and compiles
//! a version once. [`apply`] makes the registry and the app table match the record; it runs after
//! a local upload or delete, on every replicated change of a record, and at startup.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use atoll_kv::{Entry, Namespace, Origin, Register, Write};
use atoll_sync::Node;
use atoll_sync::http::HttpTransport;

use super::{Deployed, Site};
use crate::registry::AppRecord;
use crate::signing::DeployRecord;

fn namespace(site: &Site) -> Result<Namespace> {
    Ok(Namespace::new("_atoll", "apps", site.kv.bounds())?)
}

/// Records the app's new version (or its deletion) in the replicated namespace.
pub(crate) async fn publish(site: &Site, name: &str, record: &DeployRecord) -> Result<()> {
    let write = Write::Set(serde_json::to_vec(record)?);
    site.kv.write(&namespace(site)?, name.as_bytes(), write).await.context("cannot record the deploy")?;
    Ok(())
}

/// The replicated record of `name`, if it has one (a record this build cannot read counts as
/// none: startup records the registry's app again).
pub(crate) fn record(site: &Site, name: &str) -> Result<Option<DeployRecord>> {
    let Some(bytes) = site.kv.get(&namespace(site)?, name.as_bytes())? else { return Ok(None) };
    match serde_json::from_slice(&bytes) {
        Ok(record) => Ok(Some(record)),
        Err(e) => {
            tracing::warn!(app = %name, "the replicated deploy record cannot be read: {}", parse_error(&e));
            Ok(None)
        }
    }
}

/// Why a deploy record does not parse, without the record's text: serde's own message may
/// quote a value, and a record's values include its variables.
fn parse_error(e: &serde_json::Error) -> String {
    format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column())
}

/// Whether an entry from another site may be merged: the store's admission for this site.
/// Keys of apps are data (a DNS-label app name); of the reserved namespaces only `_atoll`/`apps`
/// is replicated, and only as signed records ([`check_record`]).
pub(crate) fn admit(site: &Site, key: &[u8], entry: &Entry) -> Result<(), String> {
    let Some((ns, name)) = Namespace::split(key) else { return Err("not a composite key".into()) };
    if ns.app() != "_atoll" {
        return super::admin::validate_name(ns.app())
            .map_err(|_| format!("namespace {:?} is not an app's", ns.app()));
    }
    if ns.bucket() == super::idempotency::BUCKET {
        return super::idempotency::admit(name, entry);
    }
    if ns.bucket() != "apps" {
        return Err(format!("the reserved namespace _atoll/{} is not replicated", ns.bucket()));
    }
    let name = std::str::from_utf8(name).map_err(|_| "a deploy record's name is not UTF-8".to_owned())?;
    let record = match (&entry.register, entry.counter.is_empty()) {
        (Register::Value(bytes), true) => serde_json::from_slice::<DeployRecord>(bytes)
            .map_err(|e| format!("the deploy record of {name:?} does not parse: {}", parse_error(&e)))?,
        _ => return Err(format!("the deploy record of {name:?} is not a signed record")),
    };
    check_record(site, name, &record)?;
    // Not older than the newest deploy this site ran (the registry keeps it through deletes and
    // resyncs) nor than the record it holds: a replayed record cannot roll an app back or bring
    // a deleted one back.
    let ran = site.registry.signed_at(name).map_err(|e| format!("{e:#}"))?;
    let held = site.kv.entries_at(&[key.to_vec()]).map_err(|e| format!("{e:#}"))?.pop().map(|(_, e)| e);
    let held_at = match held.as_ref().map(|e| &e.register) {
        Some(Register::Value(bytes)) => match serde_json::from_slice::<DeployRecord>(bytes) {
            Ok(here) => here.signed_at_ms,
            // What this site holds cannot be read: nothing is admitted over it.
            Err(_) => u64::MAX,
        },
        _ => 0,
    };
    let newest = ran.max(held_at);
    if record.signed_at_ms < newest {
        return Err(format!(
            "the deploy record of {name:?} was signed at {} ms, before the one here ({newest} ms)",
            record.signed_at_ms
        ));
    }
    // The same signing time: only the very same entry (a copy by another path), never the same
    // record stamped again (which would win the store's last-writer-wins order over a newer
    // deploy still on its way).
    if record.signed_at_ms == held_at
        && let Some(held) = held
        && held != *entry
    {
        return Err(format!("the deploy record of {name:?} is a copy of the one here with another stamp"));
    }
    Ok(())
}

/// What an upload checks, for a record: the name, the version, the parameters, the signature.
pub(crate) fn check_record(site: &Site, name: &str, record: &DeployRecord) -> Result<(), String> {
    super::admin::validate_name(name).map_err(|e| e.reason().to_owned())?;
    if let Some(version) = &record.version
        && !crate::signing::is_version(version)
    {
        return Err(format!("the deploy record of {name:?} has a malformed version"));
    }
    record.params.settings(&site.default_limits, &site.caps)?;
    site.trust.verify(name, record)
}

/// Makes this site serve what the replicated record of `name` says, fetching the component from
/// a peer when this site does not have it. Holds the admin lock while it changes anything.
pub(crate) async fn apply(
    site: &Arc<Site>,
    name: &str,
    peers: Option<(&Node<atoll_kv::Store>, &HttpTransport)>,
) -> Result<()> {
    let _guard = site.admin_lock.lock().await;
    let wanted = match record(site, name)? {
        Some(deploy) => match &deploy.version {
            Some(version) => {
                let settings = deploy
                    .params
                    .settings(&site.default_limits, &site.caps)
                    .map_err(|e| anyhow::anyhow!("the deploy record of {name} is refused: {e}"))?;
                let mut stored: crate::registry::StoredSettings = (&settings).into();
                // Checked by `settings` above.
                stored.session = deploy.params.session().unwrap_or_default();
                Some(AppRecord {
                    version: version.clone(),
                    size: deploy.size,
                    uploaded_at_ms: deploy.signed_at_ms,
                    settings: stored,
                })
            }
            None => None,
        },
        // No record: what startup has not recorded yet is kept (see `startup`).
        None if site.apps.read().unwrap_or_else(|e| e.into_inner()).contains_key(name) => return Ok(()),
        None => None,
    };
    let current = site.apps.read().unwrap_or_else(|e| e.into_inner()).get(name).map(|d| d.record.clone());
    if current == wanted {
        return Ok(());
    }
    let signed_at = record(site, name)?.map_or(0, |r| r.signed_at_ms);
    let ran = site.registry.signed_at(name)?;
    if signed_at < ran {
        tracing::warn!(app = %name, signed_at, ran, "not running a deploy record older than the newest this site ran");
        return Ok(());
    }
    let Some(record) = wanted else {
        let (s, n) = (site.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            s.registry.raise_signed_at(&n, signed_at)?;
            s.registry.delete(&n)
        })
        .await??;
        let removed = site.apps.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        super::admin::forget_if_unused(site, removed);
        tracing::info!(app = %name, "deleted (replicated)");
        return Ok(());
    };
    let wasm = match site.registry.component(&record.version)? {
        Some(wasm) => wasm,
        None => fetch(name, &record.version, peers).await?,
    };
    let record = AppRecord { size: wasm.len() as u64, ..record };
    let app = {
        let (runtime, n, w, settings) =
            (site.runtime.clone(), name.to_owned(), wasm.clone(), (&record.settings).into());
        tokio::task::spawn_blocking(move || runtime.load(&n, &w, settings)).await??
    };
    {
        let (s, n, r) = (site.clone(), name.to_owned(), record.clone());
        tokio::task::spawn_blocking(move || {
            s.registry.raise_signed_at(&n, signed_at)?;
            s.registry.put(&n, &r, &wasm)
        })
        .await??;
    }
    let previous = site
        .apps
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_owned(), Deployed::new(app, record.clone()));
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

/// At startup: records apps deployed without a (readable) record, signed by this site if it
/// holds a deploy key; then applies every record, and removes apps whose record deletes them
/// (finishing what a crash interrupted, or a resync dropped).
pub(crate) async fn startup(site: &Arc<Site>) -> Result<()> {
    let registered: Vec<(String, AppRecord)> = site
        .apps
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(n, d)| (n.clone(), d.record.clone()))
        .collect();
    for (name, app) in registered {
        if record(site, &name)?.is_some() {
            continue;
        }
        let mut deploy = DeployRecord {
            cluster: site.trust.cluster().to_owned(),
            version: Some(app.version.clone()),
            size: app.size,
            params: params_of(&app),
            signed_at_ms: app.uploaded_at_ms,
            key: None,
            signature: None,
        };
        if site.trust.signs() {
            site.trust.sign(&name, &mut deploy)?;
        } else if site.trust.configured() {
            tracing::warn!(app = %name, "no signed deploy record, and this site holds no deploy key: deploy it again to replicate it");
        }
        publish(site, &name, &deploy).await?;
    }
    for name in all_names(site) {
        if let Err(e) = apply(site, &name, None).await {
            tracing::warn!(app = %name, "cannot apply the deploy record yet: {e:#}");
        }
    }
    Ok(())
}

/// The parameters that give an app's settings exactly, whatever the site's defaults.
fn params_of(app: &AppRecord) -> crate::signing::DeployParams {
    let s = &app.settings;
    crate::signing::DeployParams {
        deadline_ms: Some(s.deadline_ms),
        memory_mb: Some(s.max_memory_bytes >> 20),
        max_request_body_bytes: Some(s.max_request_body),
        max_response_body_bytes: Some(s.max_response_body),
        allow_hosts: (!s.allowed_hosts.is_empty()).then(|| s.allowed_hosts.join(",")),
        kv_stores: (!s.kv_stores.is_empty()).then(|| s.kv_stores.join(",")),
        vars: s.variables.clone(),
        session_cookie: s.session.cookie.then_some(true),
        stale_reads: s.session.refuse_stale.then(|| "refuse".to_owned()),
    }
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
