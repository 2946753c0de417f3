//! Backups of a live site (`GET /_atoll/backup`, admin token) and seeding a new site from one
//! (`atoll site --seed FILE`). The format is in `crate::backup`.
//!
//! A backup is one redb read transaction, taken after a barrier (every write submitted before it
//! is committed): a consistent snapshot, streamed without stopping the site or holding it in
//! memory. A seed merges the backup's entries as if a peer had sent them (the same admission:
//! deploy records must be signed by a trusted key, reserved namespaces follow their rules), in a
//! store that is new, so it has an incarnation of its own; it says its data reaches back to the
//! backup's clock, so peers that collected tombstones since make it resync rather than take back
//! a value those tombstones deleted. Then it catches up by anti-entropy, pulling only what
//! changed since.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result, bail};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;

use super::Site;
use super::admin::{ApiError, authorize};
use crate::backup::{Frame, Header, Reader, Writer};

/// The `meta` row a seed keeps: `started` until every entry is in, then `done`.
const SEED_ROW: &str = "seed";
/// What is sent at once: about a MiB of frames.
const CHUNK: usize = 1 << 20;

/// A body fed by a channel (the snapshot is read on a blocking thread).
struct Channel(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for Channel {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|next| next.map(|r| r.map(http_body::Frame::data)))
    }
}

/// Why this site may not be backed up now, if so: a backup is only as good as the site's
/// standing with its peers (a site they cut off, or one out of touch, may still hold values
/// they deleted and have since forgotten the tombstones of).
fn refusal(site: &Site) -> Option<String> {
    let node = site.sync.get()?;
    if let Some(closed) = node.guest_gate() {
        return Some(format!("its store is closed: {closed}"));
    }
    let now = atoll_sync::http::wall_ms();
    let within = node.config().max_message_age_ms;
    let out_of_touch: Vec<String> = node
        .peers()
        .into_iter()
        .filter(|p| p.active() && !p.is_self)
        .filter(|p| p.last_sync_ms.is_none_or(|t| now.saturating_sub(t) > within))
        .map(|p| p.site.unwrap_or(p.url))
        .collect();
    (!out_of_touch.is_empty()).then(|| {
        format!(
            "it has not completed a sync with {} in the last {} s: it may hold values its peers deleted \
             (back up a site in touch with its peers, or retry once it is)",
            out_of_touch.join(", "),
            within / 1000
        )
    })
}

/// `GET /_atoll/backup`: the site's data as a backup stream.
pub(super) async fn backup(State(site): State<Arc<Site>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&site, &headers)?;
    if let Some(why) = refusal(&site) {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("this site cannot be backed up now: {why}"),
        ));
    }
    let taken_at = site.kv.barrier().await.map_err(|e| ApiError::from(anyhow::anyhow!("{e}")))?;
    let bound = site.sync.get().map_or(0, |n| n.config().max_clock_offset_ms);
    let since = atoll_kv::Hlc { physical_ms: taken_at.physical_ms.saturating_sub(2 * bound), logical: 0 };
    let header = Header {
        site: site.name.clone(),
        region: site.region.clone(),
        incarnation: format!("{:016x}", site.kv.identity().incarnation),
        taken_at: (taken_at.physical_ms, taken_at.logical),
        since: (since.physical_ms, since.logical),
        atoll: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let from = site.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = stream(&from, &header, &tx) {
            // The body breaks off: the client sees no trailer and keeps nothing.
            tracing::warn!("a backup stopped: {e:#}");
            let _ = tx.blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
        }
    });
    let mut response = Response::new(Body::new(Channel(rx)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    metrics::counter!("atoll_backups_total").increment(1);
    Ok(response)
}

/// Writes the backup into `tx`, a chunk at a time.
fn stream(
    site: &Site,
    header: &Header,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<()> {
    let send = |buf: &mut Vec<u8>| -> Result<()> {
        let chunk = Bytes::from(std::mem::replace(buf, Vec::with_capacity(CHUNK + (64 << 10))));
        tx.blocking_send(Ok(chunk)).map_err(|_| anyhow::anyhow!("the client went away"))
    };
    let (mut writer, mut buf) = Writer::start(header);
    site.kv.scan_encoded(|key, encoded| -> Result<()> {
        writer.entry(&mut buf, key, encoded);
        if buf.len() >= CHUNK {
            send(&mut buf)?;
        }
        Ok(())
    })?;
    // One component in memory at a time.
    for version in site.registry.versions()? {
        if let Some(wasm) = site.registry.component(&version)? {
            writer.component(&mut buf, &version, &wasm);
            send(&mut buf)?;
        }
    }
    writer.finish(&mut buf);
    send(&mut buf)
}

/// What [`seed`] found to do.
pub(crate) enum Seeding {
    /// A new store: seed it.
    Fresh,
    /// Seeded before (a restart with the same `--seed`): nothing to do.
    Done,
}

/// Refuses to start a site whose seed was interrupted, unless `--seed` is given again: its store
/// holds only part of a backup.
pub(crate) fn interrupted(kv: &atoll_kv::Store) -> Result<()> {
    if kv.meta(SEED_ROW)?.as_deref() == Some(b"started") {
        bail!(
            "this site's seed from a backup did not finish: start it again with the same --seed FILE \
             (merging again is harmless), or with an empty data dir"
        );
    }
    Ok(())
}

/// Whether `--seed` applies to the store at `kv_path` (checked before it is opened: `existed`).
pub(crate) fn seeding(kv: &atoll_kv::Store, existed: bool) -> Result<Seeding> {
    match kv.meta(SEED_ROW)?.as_deref() {
        Some(b"done") => Ok(Seeding::Done),
        // An interrupted seed: merging again is harmless (merges are idempotent).
        Some(_) => Ok(Seeding::Fresh),
        None if !existed => Ok(Seeding::Fresh),
        None => bail!(
            "--seed starts a new site from a backup, but the data dir already holds a store that was \
             not seeded: start with an empty data dir, or without --seed"
        ),
    }
}

/// Seeds this site's new store from the backup at `path`: checks the whole file first (every
/// frame read, every entry decoded and within the store's bounds and the clock bound, every
/// component hashed: a file that fails changes nothing), then merges it, then stores its
/// components. `max_ahead_ms`: how far ahead of this site's clock a stamp may be (the clock
/// bound replication holds entries to).
pub(crate) async fn seed(site: &Arc<Site>, path: &Path, max_ahead_ms: u64) -> Result<()> {
    let started = std::time::Instant::now();
    let horizon = atoll_kv::hlc::wall_ms().saturating_add(max_ahead_ms);
    let max_key = site.kv.bounds().max_key + 2 + 2 * 255;
    let (header, entries, components, bytes) = crate::backup::verify(path, |frame| match frame {
        Frame::Entry(key, encoded) => {
            if key.len() > max_key {
                bail!("a key of {} bytes, over the store's bound", key.len());
            }
            let entry = atoll_kv::codec::decode(encoded)
                .map_err(|e| anyhow::anyhow!("an entry this build cannot read: {e}"))?;
            if entry.changed.hlc.physical_ms > horizon {
                bail!(
                    "an entry stamped {} ms ahead of this site's clock, past the clock bound",
                    entry.changed.hlc.physical_ms - atoll_kv::hlc::wall_ms()
                );
            }
            Ok(())
        }
        Frame::Component(version, wasm) => {
            use sha2::Digest;
            let hash: String = sha2::Sha256::digest(wasm).iter().map(|b| format!("{b:02x}")).collect();
            if hash != *version {
                bail!("a component said to be version {version} hashes to {hash}");
            }
            Ok(())
        }
    })?;
    site.kv.set_meta(SEED_ROW, b"started")?;
    site.kv.reach_back_to(header.since())?;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = Reader::open(std::io::BufReader::with_capacity(1 << 20, file))?;
    let (mut batch, mut batch_bytes, mut merged) = (Vec::new(), 0usize, 0usize);
    while let Some(frame) = reader.next()? {
        match frame {
            Frame::Entry(key, encoded) => {
                batch_bytes += key.len() + encoded.len();
                let entry = atoll_kv::codec::decode(&encoded)
                    .map_err(|e| anyhow::anyhow!("the backup holds an entry this build cannot read: {e}"))?;
                batch.push((key, entry));
                if batch.len() >= 1000 || batch_bytes >= 4 << 20 {
                    merged += site.kv.merge(std::mem::take(&mut batch)).await?;
                    batch_bytes = 0;
                }
            }
            Frame::Component(version, wasm) => {
                let registry = &site.registry;
                registry.put_component(&version, &wasm)?;
            }
        }
    }
    merged += site.kv.merge(batch).await?;
    site.kv.set_meta(SEED_ROW, b"done")?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        from = %header.site,
        entries,
        merged,
        components,
        mib = bytes as f64 / (1 << 20) as f64,
        mib_per_s = bytes as f64 / (1 << 20) as f64 / secs.max(1e-3),
        "seeded from a backup (entries a peer's rules refuse are left out); anti-entropy brings what changed since"
    );
    Ok(())
}
