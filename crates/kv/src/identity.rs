//! Who a store is: the site's name plus the data dir's **incarnation**, a random id taken when the
//! data dir is created and again whenever the site learns that its data dir is an older copy of
//! itself (a restored backup, a VM snapshot, a disk that lost its last writes).
//!
//! Stamps and counter contributions carry the *writer id* (`name~` and the incarnation mixed with
//! the writer epoch, which each resync's discard moves), so a restored or resynced site never
//! reuses a stamp it used before, and its new increments are never absorbed by a max-merge with
//! its own older contributions. The boot count and the clock reading at open let peers tell
//! a restart (boot up, clock at open not behind anything they saw) from a restore (see
//! atoll-sync's ALGORITHM.md, "Identity").
//!
//! Stored in the meta table under `"identity"`: version byte 3, then the name's length (u16 LE)
//! and bytes, incarnation (u64 LE), boot count (u64 LE), `since` (HLC, 12 bytes), previous
//! incarnation (u64 LE), then the recent boots: a count (u8) and, for each, boot count (u64 LE),
//! nonce (u64 LE) and clock at open (HLC, 12 bytes); then the writer epoch (u32 LE).

use redb::{ReadableTable, Table};

use crate::hlc::{Clock, Hlc};
use crate::store::{KvError, storage};
use crate::tables::{decode_hlc, encode_hlc};

const KEY: &str = "identity";
const VERSION: u8 = 3;
/// Most recent boots kept in the lineage.
pub const LINEAGE: usize = 32;

/// One opening of the store: its boot count, random nonce and durable clock at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    /// The boot count.
    pub boot: u64,
    /// Its random id.
    pub nonce: u64,
    /// The durable clock when it opened the store.
    pub opened_at: Hlc,
}

/// A store's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Identity {
    /// The site's name.
    pub name: String,
    /// The data dir's incarnation.
    pub incarnation: u64,
    /// The incarnation it replaced when the site learned it ran on an older copy of its data
    /// dir (0: none). Peers accept the successor of the incarnation they know at once.
    pub previous: u64,
    /// How many times the store was opened (this opening included).
    pub boot: u64,
    /// A random id of this opening (not stored): two openings of copies of one data dir get the
    /// same boot count but never the same nonce.
    pub boot_nonce: u64,
    /// The clock's durable high-water mark when this boot opened the store: at least every
    /// stamp the previous boots sent anywhere, unless the data dir is an older copy.
    pub opened_at: Hlc,
    /// How far back the data reaches: the clock when the data dir was created, or the
    /// collection watermark it last resynced from. Nothing deleted before it can be in it.
    pub since: Hlc,
    /// The last [`LINEAGE`] boots, oldest first, this one last: a peer that knew an earlier boot
    /// checks that the boot after it opened at or after everything that boot reported, so a
    /// restored copy cannot pass by restarting before a peer sees it (each restart opens at a
    /// later clock, but its lineage still holds the boot that opened on the copy).
    pub boots: Vec<Boot>,
    /// Counts the resyncs that discarded entries: part of the writer id, so increments made
    /// after one are never absorbed by this site's own older contributions that peers hold.
    pub writer_epoch: u32,
}

impl Identity {
    /// The id in this store's stamps and counter contributions: `name~` and 32 bits in hex, the
    /// incarnation's low 32 bits mixed with the writer epoch (8 digits: every entry carries it
    /// twice, so it is kept short; two incarnations or epochs of one name share it with a chance
    /// of one in 2^32).
    pub fn writer(&self) -> String {
        format!("{}~{:08x}", self.name, self.incarnation as u32 ^ self.writer_epoch.wrapping_mul(0x9e37_79b9))
    }

    /// Whether two writer ids belong to one site (whatever their incarnations or epochs).
    pub fn same_site(a: &str, b: &str) -> bool {
        let name = |w: &str| w.rsplit_once('~').map_or(w, |(name, _)| name).to_owned();
        name(a) == name(b)
    }

    /// A fresh random incarnation, different from `old` (in its writer id too).
    pub(crate) fn random_incarnation(old: u64) -> u64 {
        loop {
            let next = fastrand::u64(1..);
            if next as u32 != old as u32 {
                return next;
            }
        }
    }

    /// Reads the identity at open (creating it for a new or pre-identity store), counts the boot,
    /// and saves it. `fresh`: the store was created by this opening.
    pub(crate) fn open(
        meta: &mut Table<&str, &[u8]>,
        name: &str,
        fresh: bool,
        clock: &Clock,
    ) -> Result<Identity, KvError> {
        let stored = match meta.get(KEY).map_err(storage)? {
            Some(v) => Some(Identity::decode(v.value())?),
            None => None,
        };
        let mut identity = match stored {
            Some(i) if i.name == name => i,
            // A new data dir reaches back to now; an upgraded one (format 2) to the beginning;
            // a data dir renamed to another site is a new incarnation of that site.
            other => Identity {
                name: name.to_owned(),
                incarnation: Identity::random_incarnation(0),
                previous: 0,
                boot: 0,
                boot_nonce: 0,
                opened_at: Hlc::ZERO,
                boots: Vec::new(),
                writer_epoch: 0,
                since: if fresh { clock.now() } else { other.map_or(Hlc::ZERO, |o| o.since) },
            },
        };
        identity.boot = identity.boot.saturating_add(1);
        identity.boot_nonce = fastrand::u64(..);
        identity.opened_at = clock.last();
        identity.boots.push(Boot {
            boot: identity.boot,
            nonce: identity.boot_nonce,
            opened_at: identity.opened_at,
        });
        if identity.boots.len() > LINEAGE {
            identity.boots.remove(0);
        }
        identity.save(meta)?;
        Ok(identity)
    }

    /// The identity as stored (in the transaction `meta` belongs to).
    pub(crate) fn load(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Identity, KvError> {
        match meta.get(KEY).map_err(storage)? {
            Some(v) => Identity::decode(v.value()),
            None => Err(KvError::Storage("the store has no identity".into())),
        }
    }

    pub(crate) fn save(&self, meta: &mut Table<&str, &[u8]>) -> Result<(), KvError> {
        meta.insert(KEY, self.encode().as_slice()).map_err(storage)?;
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.incarnation.to_le_bytes());
        out.extend_from_slice(&self.boot.to_le_bytes());
        out.extend_from_slice(&encode_hlc(self.since));
        out.extend_from_slice(&self.previous.to_le_bytes());
        let boots = &self.boots[self.boots.len().saturating_sub(LINEAGE)..];
        out.push(boots.len() as u8);
        for b in boots {
            out.extend_from_slice(&b.boot.to_le_bytes());
            out.extend_from_slice(&b.nonce.to_le_bytes());
            out.extend_from_slice(&encode_hlc(b.opened_at));
        }
        out.extend_from_slice(&self.writer_epoch.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Identity, KvError> {
        let bad = || KvError::Storage("corrupt store identity".into());
        let (&version, rest) = bytes.split_first().ok_or_else(bad)?;
        if version != VERSION {
            return Err(KvError::Storage(format!(
                "store identity version {version} is not supported (this build reads {VERSION})"
            )));
        }
        let len = u16::from_le_bytes(rest.get(..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        let rest = &rest[2..];
        let name = std::str::from_utf8(rest.get(..len).ok_or_else(bad)?).map_err(|_| bad())?.to_owned();
        let rest = &rest[len..];
        let u64_at = |at: usize| -> Result<u64, KvError> {
            Ok(u64::from_le_bytes(rest.get(at..at + 8).ok_or_else(bad)?.try_into().map_err(|_| bad())?))
        };
        let mut boots = Vec::new();
        let count = *rest.get(36).ok_or_else(bad)? as usize;
        for i in 0..count {
            let at = 37 + i * 28;
            boots.push(Boot {
                boot: u64_at(at)?,
                nonce: u64_at(at + 8)?,
                opened_at: decode_hlc(rest.get(at + 16..at + 28).ok_or_else(bad)?)?,
            });
        }
        let at = 37 + count * 28;
        let writer_epoch =
            u32::from_le_bytes(rest.get(at..at + 4).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        // The last boot's nonce is kept: the next opening's lineage names it.
        let last = boots.last().copied();
        Ok(Identity {
            name,
            incarnation: u64_at(0)?,
            boot: u64_at(8)?,
            boot_nonce: last.map_or(0, |b| b.nonce),
            opened_at: last.map_or(Hlc::ZERO, |b| b.opened_at),
            since: decode_hlc(rest.get(16..28).ok_or_else(bad)?)?,
            previous: u64_at(28)?,
            boots,
            writer_epoch,
        })
    }
}
