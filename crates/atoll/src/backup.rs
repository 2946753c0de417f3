//! Backups: the file format (version 1), and `atoll backup`.
//!
//! A backup is what one site held at one moment: every key-value entry as the store keeps it
//! (every app's data and the reserved namespaces: deploy records, idempotency records; stamps,
//! counter parts and tombstones included) and the component of every app deployed there. The
//! format, all integers little-endian:
//!
//! - `atoll-backup 1\n`, then the [`Header`] as one line of JSON;
//! - frames: `E`, key length (u32), composite key, length (u32), the entry as `atoll_kv::codec`
//!   encodes it; `C`, version length (u32), version (SHA-256 hex), length (u32), component bytes;
//! - the trailer: `Z`, the number of entries and of components (u64 each), and the SHA-256 of
//!   every byte before the digest. A file without it (cut short) or with another digest is refused
//!   whole.
//!
//! `atoll site --seed FILE` starts a new site from one (see `site/backups.rs`).

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use atoll_kv::Hlc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"atoll-backup 1\n";
/// The most any frame may claim: a composite key, an encoded entry, a component.
const MAX_KEY: usize = 64 << 10;
const MAX_ENTRY: usize = 2 << 20;
const MAX_COMPONENT: usize = 1 << 30;

/// What a backup says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Header {
    /// The site it was taken at.
    pub site: String,
    pub region: String,
    /// The site's incarnation then (hex).
    pub incarnation: String,
    /// The site's durable clock when the snapshot was taken (every change that arrived before it
    /// is in the backup).
    pub taken_at: (u64, u32),
    /// How far back a site seeded from it says its data reaches: `taken_at` less two clock
    /// bounds (peers compare it with their own clocks' collection watermarks).
    pub since: (u64, u32),
    /// The Atoll version that wrote it.
    pub atoll: String,
}

impl Header {
    pub(crate) fn since(&self) -> Hlc {
        Hlc { physical_ms: self.since.0, logical: self.since.1 }
    }
}

/// What a backup holds, one frame at a time.
pub(crate) enum Frame {
    /// A composite key and its encoded entry.
    Entry(Vec<u8>, Vec<u8>),
    /// A component's version and bytes.
    Component(String, Vec<u8>),
}

/// Writes the format into buffers (the caller sends or stores them), hashing as it goes.
pub(crate) struct Writer {
    hash: Sha256,
    entries: u64,
    components: u64,
}

impl Writer {
    /// The writer, and the bytes that start the backup.
    pub(crate) fn start(header: &Header) -> (Writer, Vec<u8>) {
        let mut out = MAGIC.to_vec();
        out.extend(serde_json::to_vec(header).unwrap_or_default());
        out.push(b'\n');
        let mut writer = Writer { hash: Sha256::new(), entries: 0, components: 0 };
        writer.hash.update(&out);
        (writer, out)
    }

    fn frame(&mut self, out: &mut Vec<u8>, tag: u8, a: &[u8], b: &[u8]) {
        let from = out.len();
        out.push(tag);
        out.extend((a.len() as u32).to_le_bytes());
        out.extend(a);
        out.extend((b.len() as u32).to_le_bytes());
        out.extend(b);
        self.hash.update(&out[from..]);
    }

    pub(crate) fn entry(&mut self, out: &mut Vec<u8>, key: &[u8], encoded: &[u8]) {
        self.entries += 1;
        self.frame(out, b'E', key, encoded);
    }

    pub(crate) fn component(&mut self, out: &mut Vec<u8>, version: &str, wasm: &[u8]) {
        self.components += 1;
        self.frame(out, b'C', version.as_bytes(), wasm);
    }

    pub(crate) fn finish(mut self, out: &mut Vec<u8>) {
        let from = out.len();
        out.push(b'Z');
        out.extend(self.entries.to_le_bytes());
        out.extend(self.components.to_le_bytes());
        self.hash.update(&out[from..]);
        out.extend(self.hash.finalize());
    }
}

/// Reads a backup frame by frame; the trailer's counts and digest are checked when it is reached
/// ([`Reader::next`] answers `None` only then).
pub(crate) struct Reader<R> {
    from: R,
    hash: Sha256,
    pub(crate) header: Header,
    entries: u64,
    components: u64,
    /// Bytes read so far.
    pub(crate) bytes: u64,
}

impl<R: Read> Reader<R> {
    pub(crate) fn open(mut from: R) -> Result<Reader<R>> {
        let mut magic = vec![0; MAGIC.len()];
        from.read_exact(&mut magic).context("not an Atoll backup (too short)")?;
        if magic != MAGIC {
            bail!("not an Atoll backup, or a version this build does not read (it starts {magic:?})");
        }
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            if line.len() > 64 << 10 {
                bail!("the backup's header is not a line of JSON");
            }
            from.read_exact(&mut byte).context("the backup is cut short in its header")?;
            line.push(byte[0]);
        }
        let header: Header =
            serde_json::from_slice(&line).context("the backup's header is not what this build writes")?;
        let mut hash = Sha256::new();
        hash.update(MAGIC);
        hash.update(&line);
        let bytes = (MAGIC.len() + line.len()) as u64;
        Ok(Reader { from, hash, header, entries: 0, components: 0, bytes })
    }

    fn exact(&mut self, n: usize) -> Result<Vec<u8>> {
        // Grown as bytes come, not allocated at once: a short file claiming a huge frame costs
        // what it holds.
        let mut buf = Vec::new();
        (&mut self.from).take(n as u64).read_to_end(&mut buf)?;
        if buf.len() != n {
            bail!("the backup is cut short (no trailer): refused whole");
        }
        self.hash.update(&buf);
        self.bytes += n as u64;
        Ok(buf)
    }

    fn part(&mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let len = u32::from_le_bytes(self.exact(4)?.try_into().unwrap_or_default()) as usize;
        if len > max {
            bail!("the backup is corrupt: a {what} of {len} bytes");
        }
        self.exact(len)
    }

    /// The next frame, or `None` after a trailer that checks out.
    pub(crate) fn next(&mut self) -> Result<Option<Frame>> {
        match self.exact(1)?[0] {
            b'E' => {
                let key = self.part(MAX_KEY, "key")?;
                let entry = self.part(MAX_ENTRY, "entry")?;
                self.entries += 1;
                Ok(Some(Frame::Entry(key, entry)))
            }
            b'C' => {
                let version = String::from_utf8(self.part(256, "version")?)
                    .context("the backup is corrupt: a version that is not text")?;
                let wasm = self.part(MAX_COMPONENT, "component")?;
                self.components += 1;
                Ok(Some(Frame::Component(version, wasm)))
            }
            b'Z' => {
                let counts = self.exact(16)?;
                let digest = std::mem::take(&mut self.hash).finalize();
                let mut stored = [0u8; 32];
                self.from.read_exact(&mut stored).context("the backup is cut short in its trailer")?;
                self.bytes += 32;
                let entries = u64::from_le_bytes(counts[..8].try_into().unwrap_or_default());
                let components = u64::from_le_bytes(counts[8..].try_into().unwrap_or_default());
                if digest[..] != stored || (entries, components) != (self.entries, self.components) {
                    bail!("the backup is corrupt: its checksum does not match its contents");
                }
                if self.from.read(&mut [0u8; 1])? != 0 {
                    bail!("the backup has bytes after its trailer: refused whole");
                }
                Ok(None)
            }
            other => bail!("the backup is corrupt: unknown frame {other:#04x} after {} bytes", self.bytes),
        }
    }

    /// How many entries and components were read.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.entries, self.components)
    }
}

/// Reads a whole backup file, checking every frame and the trailer: its header and counts.
/// `check` sees every frame first (a seed decodes every entry and checks every component here,
/// so that the pass that merges them cannot fail half-way on what the file holds).
pub(crate) fn verify(
    path: &Path,
    mut check: impl FnMut(&Frame) -> Result<()>,
) -> Result<(Header, u64, u64, u64)> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = Reader::open(BufReader::with_capacity(1 << 20, file))
        .with_context(|| format!("{} is not a backup Atoll can read", path.display()))?;
    while let Some(frame) = reader.next().with_context(|| format!("{} is refused", path.display()))? {
        check(&frame).with_context(|| format!("{} is refused", path.display()))?;
    }
    let (entries, components) = reader.counts();
    Ok((reader.header.clone(), entries, components, reader.bytes))
}

#[derive(Debug, clap::Args)]
pub(crate) struct BackupArgs {
    #[command(flatten)]
    client: crate::ClientArgs,
    /// Where to write the backup (written aside, checked, then renamed: an interrupted backup
    /// leaves no file that looks whole).
    #[arg(long)]
    out: PathBuf,
}

/// `atoll backup`: streams a live site's snapshot into a file, then checks it whole.
pub(crate) fn run(args: &BackupArgs) -> Result<()> {
    let site = crate::client::Site::new(&args.client)?;
    let started = std::time::Instant::now();
    let mut response =
        site.answered("backup", site.auth(site.agent.get(site.url("/_atoll/backup"))).call())?;
    let partial = args.out.with_extension("partial");
    {
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?,
        );
        let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
        let copied = std::io::copy(&mut body, &mut file)
            .map_err(anyhow::Error::from)
            .and_then(|_| Ok(file.flush()?))
            .and_then(|()| Ok(file.get_ref().sync_all()?));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&partial);
            return Err(e.context("the backup stream broke off: nothing was kept"));
        }
    }
    let took = started.elapsed();
    let (header, entries, components, bytes) = match verify(&partial, |_| Ok(())) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &args.out).with_context(|| format!("cannot write {}", args.out.display()))?;
    let mib = bytes as f64 / (1 << 20) as f64;
    println!(
        "backup of {} ({} entries, {} components, {:.1} MiB) in {:.1} s ({:.0} MiB/s) -> {}",
        header.site,
        entries,
        components,
        mib,
        took.as_secs_f64(),
        mib / took.as_secs_f64().max(1e-3),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let header = Header {
            site: "a".into(),
            region: "r".into(),
            incarnation: "1".into(),
            taken_at: (5, 1),
            since: (3, 0),
            atoll: "0".into(),
        };
        let (mut w, mut out) = Writer::start(&header);
        w.entry(&mut out, b"k1", b"v1");
        w.component(&mut out, "abc", b"wasm");
        w.entry(&mut out, b"k2", b"v2");
        w.finish(&mut out);
        out
    }

    #[test]
    fn a_backup_reads_back_frame_by_frame() {
        let bytes = sample();
        let mut r = Reader::open(&bytes[..]).expect("opens");
        assert_eq!(r.header.since(), Hlc { physical_ms: 3, logical: 0 });
        let mut seen = vec![];
        while let Some(frame) = r.next().expect("frame") {
            seen.push(match frame {
                Frame::Entry(k, v) => {
                    format!("E {} {}", String::from_utf8_lossy(&k), String::from_utf8_lossy(&v))
                }
                Frame::Component(v, w) => format!("C {v} {}", w.len()),
            });
        }
        assert_eq!(seen, ["E k1 v1", "C abc 4", "E k2 v2"]);
        assert_eq!(r.counts(), (2, 1));
    }

    #[test]
    fn a_cut_or_altered_backup_is_refused_whole() {
        let bytes = sample();
        let read_all = |b: &[u8]| -> Result<()> {
            let mut r = Reader::open(b)?;
            while r.next()?.is_some() {}
            Ok(())
        };
        for cut in [bytes.len() - 1, bytes.len() - 40, MAGIC.len() + 3] {
            let e = read_all(&bytes[..cut]).expect_err("cut");
            assert!(format!("{e:#}").contains("cut short"), "{e:#}");
        }
        let mut altered = bytes.clone();
        let at = altered.len() - 60;
        altered[at] ^= 1;
        assert!(read_all(&altered).is_err());
        assert!(format!("{:#}", read_all(b"hello").expect_err("not one")).contains("not an Atoll backup"));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(format!("{:#}", read_all(&trailing).expect_err("trailing")).contains("after its trailer"));
        // A frame claiming a gibibyte in a short file: refused, without allocating it.
        let mut huge = bytes[..bytes.len() - 49].to_vec();
        huge.push(b'C');
        huge.extend(3u32.to_le_bytes());
        huge.extend(b"abc");
        huge.extend(((1u32 << 30) - 1).to_le_bytes());
        assert!(format!("{:#}", read_all(&huge).expect_err("huge")).contains("cut short"));
    }
}
