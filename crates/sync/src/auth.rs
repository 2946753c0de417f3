//! Proof of the shared peer secret (`ATOLL_PEER_SECRET`) on every sync message.
//!
//! The header `x-atoll-sync-auth: v1 <unix ms> <hex>` carries an HMAC-SHA256 truncated to 128
//! bits (as RFC 2104 allows; forging it is still a 2^128 guess), keyed by the
//! secret, over `atoll-sync-v1 \n <unix ms> \n <purpose> \n <body>`, where the purpose names what
//! the message is (the request path, or `reply` for an answer) so that a signed reply cannot be
//! replayed as a request. A message older or newer than [`MAX_AGE_MS`] is refused; within that
//! window a replay is harmless, because every sync message is an idempotent merge or a read.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the proof.
pub const HEADER: &str = "x-atoll-sync-auth";
/// Bytes of the HMAC sent.
const TAG_BYTES: usize = 16;
/// How far a message's timestamp may be from the receiver's clock.
pub const MAX_AGE_MS: u64 = 60_000;

/// The shared secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No header.
    #[error("missing {HEADER} header")]
    Missing,
    /// Not `v1 <ms> <hex>`.
    #[error("malformed {HEADER} header")]
    Malformed,
    /// Outside the time window.
    #[error("sync message timestamp is {0} ms away from this site's clock (limit {MAX_AGE_MS} ms)")]
    Stale(u64),
    /// Wrong HMAC: a different secret, or a changed body.
    #[error("sync message signature does not match (wrong ATOLL_PEER_SECRET?)")]
    BadSignature,
}

impl Secret {
    /// A secret from its text. Refuses secrets too short to be worth anything.
    pub fn new(text: &str) -> anyhow::Result<Secret> {
        anyhow::ensure!(text.len() >= 16, "ATOLL_PEER_SECRET must be at least 16 characters");
        Ok(Secret(text.as_bytes().to_vec()))
    }

    fn mac(&self, at_ms: u64, purpose: &str, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(format!("atoll-sync-v1\n{at_ms}\n{purpose}\n").as_bytes());
        mac.update(body);
        mac
    }

    /// The header value proving `body` for `purpose` at `now_ms`.
    pub fn sign(&self, now_ms: u64, purpose: &str, body: &[u8]) -> String {
        let tag = self.mac(now_ms, purpose, body).finalize().into_bytes();
        let hex: String = tag[..TAG_BYTES].iter().map(|b| format!("{b:02x}")).collect();
        format!("v1 {now_ms} {hex}")
    }

    /// Checks a header value for `body` and `purpose` at `now_ms` (constant-time comparison).
    /// The signature is checked before the time, so a [`AuthError::Stale`] proof was made by a
    /// holder of the secret (its timestamp tells that peer's clock).
    pub fn verify(
        &self,
        header: Option<&str>,
        now_ms: u64,
        purpose: &str,
        body: &[u8],
    ) -> Result<(), AuthError> {
        let at = self.signed_at(header, purpose, body)?;
        let age = now_ms.abs_diff(at);
        if age > MAX_AGE_MS {
            return Err(AuthError::Stale(age));
        }
        Ok(())
    }

    /// The time a valid proof was made at, whatever it is.
    pub fn signed_at(&self, header: Option<&str>, purpose: &str, body: &[u8]) -> Result<u64, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let mut parts = header.split(' ');
        let (Some("v1"), Some(at), Some(hex), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let at: u64 = at.parse().map_err(|_| AuthError::Malformed)?;
        if hex.len() != 2 * TAG_BYTES || !hex.is_ascii() {
            return Err(AuthError::Malformed);
        }
        let tag: Vec<u8> = (0..TAG_BYTES)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| AuthError::Malformed)?;
        self.mac(at, purpose, body).verify_truncated_left(&tag).map_err(|_| AuthError::BadSignature)?;
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_only_for_its_secret_body_purpose_and_time() {
        let s = Secret::new("0123456789abcdef").expect("secret");
        let h = s.sign(1_000_000, "/_atoll/sync", b"body");
        assert_eq!(s.verify(Some(&h), 1_000_500, "/_atoll/sync", b"body"), Ok(()));
        assert_eq!(s.verify(Some(&h), 1_000_500, "/_atoll/sync", b"bodY"), Err(AuthError::BadSignature));
        assert_eq!(s.verify(Some(&h), 1_000_500, "reply", b"body"), Err(AuthError::BadSignature));
        let other = Secret::new("fedcba9876543210").expect("secret");
        assert_eq!(other.verify(Some(&h), 1_000_500, "/_atoll/sync", b"body"), Err(AuthError::BadSignature));
        assert!(matches!(
            s.verify(Some(&h), 1_000_000 + MAX_AGE_MS + 1, "/_atoll/sync", b"body"),
            Err(AuthError::Stale(_))
        ));
        assert_eq!(s.verify(None, 1_000_000, "/_atoll/sync", b"body"), Err(AuthError::Missing));
        assert_eq!(s.verify(Some("v1 12 zz"), 1_000_000, "/_atoll/sync", b"body"), Err(AuthError::Malformed));
        assert!(Secret::new("short").is_err());
    }
}
