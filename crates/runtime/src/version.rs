//! The identity of an uploaded component: the SHA-256 of its bytes.

use sha2::{Digest, Sha256};

/// The content hash of a component, as 64 lowercase hex digits. Two uploads of the same bytes
/// are the same version, on every site.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(String);

impl Version {
    /// The version of these component bytes.
    pub fn of(wasm: &[u8]) -> Version {
        let digest = Sha256::digest(wasm);
        let mut hex = String::with_capacity(64);
        for byte in digest {
            hex.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
            hex.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
        }
        Version(hex)
    }

    /// Parses a version written as 64 hex digits.
    pub fn parse(hex: &str) -> Option<Version> {
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| Version(hex.to_owned()))
    }

    /// The hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_sha256_hex() {
        let v = Version::of(b"abc");
        assert_eq!(v.as_str(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Version::parse(v.as_str()), Some(v));
        assert_eq!(Version::parse("BA78"), None);
        assert_eq!(Version::parse(&"g".repeat(64)), None);
    }
}
