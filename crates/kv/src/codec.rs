//! The on-disk and on-wire encoding of an [`Entry`], versioned explicitly.
//!
//! Format version 1, all integers little-endian:
//! ```text
//! u8 version (1)
//! stamp:   u64 physical_ms, u32 logical, u16 site length, site bytes
//! changed: the same layout
//! u8 register tag: 0 tombstone, 1 value; for a value: u32 length, bytes
//! u16 contribution count; each: u16 site length, site bytes, u64 up, u64 down
//! ```
//! Decoding checks every length against the input and rejects trailing bytes.

use std::collections::BTreeMap;

use crate::entry::{Contribution, Entry, Register, Stamp};
use crate::hlc::Hlc;

/// The encoding version written by [`encode`].
pub const ENTRY_FORMAT: u8 = 1;

/// Why bytes could not be decoded as an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended early.
    #[error("entry is truncated")]
    Truncated,
    /// The version byte is not one this build reads.
    #[error("entry has format version {0}, this build reads version {ENTRY_FORMAT}")]
    UnknownVersion(u8),
    /// A field holds an impossible value.
    #[error("entry is malformed: {0}")]
    Malformed(&'static str),
}

/// Encodes an entry. Site ids longer than u16::MAX bytes or values longer than u32::MAX bytes
/// are refused earlier, by the store's bounds.
pub fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + value_len(&entry.register));
    out.push(ENTRY_FORMAT);
    put_stamp(&mut out, &entry.stamp);
    put_stamp(&mut out, &entry.changed);
    match &entry.register {
        Register::Tombstone => out.push(0),
        Register::Value(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
    }
    out.extend_from_slice(&(entry.counter.len() as u16).to_le_bytes());
    for (site, c) in &entry.counter {
        put_site(&mut out, site);
        out.extend_from_slice(&c.up.to_le_bytes());
        out.extend_from_slice(&c.down.to_le_bytes());
    }
    out
}

fn value_len(register: &Register) -> usize {
    match register {
        Register::Tombstone => 0,
        Register::Value(v) => v.len(),
    }
}

fn put_site(out: &mut Vec<u8>, site: &str) {
    out.extend_from_slice(&(site.len() as u16).to_le_bytes());
    out.extend_from_slice(site.as_bytes());
}

fn put_stamp(out: &mut Vec<u8>, stamp: &Stamp) {
    out.extend_from_slice(&stamp.hlc.physical_ms.to_le_bytes());
    out.extend_from_slice(&stamp.hlc.logical.to_le_bytes());
    put_site(out, &stamp.site);
}

/// Decodes an entry written by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Entry, DecodeError> {
    let mut r = Reader { bytes };
    match r.u8()? {
        ENTRY_FORMAT => {}
        other => return Err(DecodeError::UnknownVersion(other)),
    }
    let stamp = r.stamp()?;
    let changed = r.stamp()?;
    let register = match r.u8()? {
        0 => Register::Tombstone,
        1 => {
            let len = r.u32()? as usize;
            Register::Value(r.take(len)?.to_vec())
        }
        _ => return Err(DecodeError::Malformed("unknown register tag")),
    };
    let mut counter = BTreeMap::new();
    for _ in 0..r.u16()? {
        let site = r.site()?;
        let c = Contribution { up: r.u64()?, down: r.u64()? };
        if counter.insert(site, c).is_some() {
            return Err(DecodeError::Malformed("duplicate counter site"));
        }
    }
    if !r.bytes.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    if changed < stamp {
        return Err(DecodeError::Malformed("changed stamp is older than the register stamp"));
    }
    Ok(Entry { stamp, register, counter, changed })
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn site(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| DecodeError::Malformed("site id is not UTF-8"))
    }

    fn stamp(&mut self) -> Result<Stamp, DecodeError> {
        let physical_ms = self.u64()?;
        let logical = self.u32()?;
        Ok(Stamp { hlc: Hlc { physical_ms, logical }, site: self.site()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let stamp = Stamp { hlc: Hlc { physical_ms: 7, logical: 3 }, site: "us-east".into() };
        let (e, _) = Entry::set(b"12".to_vec(), stamp.clone())
            .increment(5, Stamp { hlc: Hlc { physical_ms: 8, logical: 0 }, site: "eu-west".into() })
            .expect("numeric");
        e
    }

    #[test]
    fn round_trips() {
        for e in [sample(), Entry::absent(), Entry::set(Vec::new(), Stamp::zero())] {
            assert_eq!(decode(&encode(&e)), Ok(e));
        }
    }

    #[test]
    fn every_truncation_and_extension_is_rejected() {
        let bytes = encode(&sample());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(DecodeError::Malformed("trailing bytes")));
        let mut other_version = bytes;
        other_version[0] = 2;
        assert_eq!(decode(&other_version), Err(DecodeError::UnknownVersion(2)));
    }
}
