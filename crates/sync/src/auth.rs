//! Proof of the shared peer secret (`ATOLL_PEER_SECRET`) on every sync message.
//!
//! The header `x-atoll-sync-auth: v2 <unix ms> <nonce> <hex>` carries an HMAC-SHA256 truncated to
//! 128 bits (as RFC 2104 allows; forging it is still a 2^128 guess), keyed by the secret, over
//! `atoll-sync-v2 \n <unix ms> \n <nonce> \n <recipient> \n <purpose> \n <body>`:
//! - the **purpose** names what the message is: the request path, or for an answer `reply` and the
//!   request's own proof, so an answer holds for the one request it answers (its body, time,
//!   nonce and recipient) and for no other, and a signed answer is never a request;
//! - the **recipient** is the name of the site the request is for (empty only for a hello to a
//!   site not known by name yet), so a request captured on its way to one site is refused by
//!   every other;
//! - the **nonce** is random per message: a receiver remembers the nonces of the requests it
//!   took within the time window ([`Replays`]), so a captured request is refused when replayed,
//!   and one older or newer than [`MAX_AGE_MS`] is refused by its time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the proof.
pub const HEADER: &str = "x-atoll-sync-auth";
/// Bytes of the HMAC sent.
const TAG_BYTES: usize = 16;
/// How far a message's timestamp may be from the receiver's clock.
pub const MAX_AGE_MS: u64 = 60_000;

/// What a valid proof says: when it was made, and its nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    /// The signer's clock when it signed (ms since the Unix epoch).
    pub at_ms: u64,
    /// The message's random nonce.
    pub nonce: u64,
}

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
    /// Wrong HMAC: a different secret, a changed body, or signed for another site.
    #[error(
        "sync message signature does not match (a different ATOLL_PEER_SECRET, or signed for another site)"
    )]
    BadSignature,
}

impl Secret {
    /// A secret from its text. Refuses secrets too short to be worth anything.
    pub fn new(text: &str) -> anyhow::Result<Secret> {
        anyhow::ensure!(text.len() >= 16, "ATOLL_PEER_SECRET must be at least 16 characters");
        Ok(Secret(text.as_bytes().to_vec()))
    }

    fn mac(&self, at_ms: u64, nonce: u64, to: &str, purpose: &str, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(format!("atoll-sync-v2\n{at_ms}\n{nonce:016x}\n{to}\n{purpose}\n").as_bytes());
        mac.update(body);
        mac
    }

    /// The header value proving `body` for `purpose`, sent to the site named `to` ("" when its
    /// name is not known yet), at `now_ms`, with a fresh nonce.
    pub fn sign(&self, now_ms: u64, to: &str, purpose: &str, body: &[u8]) -> String {
        self.sign_with(now_ms, fastrand::u64(..), to, purpose, body)
    }

    fn sign_with(&self, now_ms: u64, nonce: u64, to: &str, purpose: &str, body: &[u8]) -> String {
        let tag = self.mac(now_ms, nonce, to, purpose, body).finalize().into_bytes();
        let hex: String = tag[..TAG_BYTES].iter().map(|b| format!("{b:02x}")).collect();
        format!("v2 {now_ms} {nonce:016x} {hex}")
    }

    /// The purpose an answer to the request with proof `request_proof` is signed for.
    pub fn reply_purpose(request_proof: &str) -> String {
        format!("reply\n{request_proof}")
    }

    /// Checks a header value for `body`, `to` and `purpose` at `now_ms` (constant-time
    /// comparison). The signature is checked before the time, so a [`AuthError::Stale`] proof
    /// was made by a holder of the secret (its timestamp tells that signer's clock).
    pub fn verify(
        &self,
        header: Option<&str>,
        now_ms: u64,
        to: &str,
        purpose: &str,
        body: &[u8],
    ) -> Result<Proof, AuthError> {
        let proof = self.signed_at(header, to, purpose, body)?;
        let age = now_ms.abs_diff(proof.at_ms);
        if age > MAX_AGE_MS {
            return Err(AuthError::Stale(age));
        }
        Ok(proof)
    }

    /// What a valid proof says, whatever its time.
    pub fn signed_at(
        &self,
        header: Option<&str>,
        to: &str,
        purpose: &str,
        body: &[u8],
    ) -> Result<Proof, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let mut parts = header.split(' ');
        let (Some("v2"), Some(at), Some(nonce), Some(hex), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let at: u64 = at.parse().map_err(|_| AuthError::Malformed)?;
        if nonce.len() != 16 {
            return Err(AuthError::Malformed);
        }
        let nonce = u64::from_str_radix(nonce, 16).map_err(|_| AuthError::Malformed)?;
        if hex.len() != 2 * TAG_BYTES || !hex.is_ascii() {
            return Err(AuthError::Malformed);
        }
        let tag: Vec<u8> = (0..TAG_BYTES)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| AuthError::Malformed)?;
        self.mac(at, nonce, to, purpose, body)
            .verify_truncated_left(&tag)
            .map_err(|_| AuthError::BadSignature)?;
        Ok(Proof { at_ms: at, nonce })
    }
}

/// The nonces of the requests a site took within the time window: a request seen once is
/// refused when it comes again (a replay). Bounded: past [`Replays::MAX`] nonces, requests are
/// refused until the oldest expire (a flood of valid requests needs the secret).
#[derive(Debug, Default)]
pub struct Replays {
    seen: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
}

impl Replays {
    /// The most nonces remembered.
    pub const MAX: usize = 1 << 20;

    /// Records `proof`'s nonce at `now_ms`; `false` if it was seen already (or the record is full).
    pub fn first_time(&self, proof: Proof, now_ms: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= Self::MAX / 2 {
            // Anything older than twice the window cannot pass the time check any more.
            seen.retain(|_, at| now_ms.saturating_sub(*at) <= 2 * MAX_AGE_MS);
            if seen.len() >= Self::MAX {
                return false;
            }
        }
        seen.insert(proof.nonce, now_ms).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_only_for_its_secret_body_recipient_purpose_and_time() {
        let s = Secret::new("0123456789abcdef").expect("secret");
        let h = s.sign(1_000_000, "b", "/_atoll/sync", b"body");
        assert!(s.verify(Some(&h), 1_000_500, "b", "/_atoll/sync", b"body").is_ok());
        assert_eq!(s.verify(Some(&h), 1_000_500, "b", "/_atoll/sync", b"bodY"), Err(AuthError::BadSignature));
        assert_eq!(s.verify(Some(&h), 1_000_500, "c", "/_atoll/sync", b"body"), Err(AuthError::BadSignature));
        assert_eq!(s.verify(Some(&h), 1_000_500, "b", "reply", b"body"), Err(AuthError::BadSignature));
        let other = Secret::new("fedcba9876543210").expect("secret");
        assert_eq!(
            other.verify(Some(&h), 1_000_500, "b", "/_atoll/sync", b"body"),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            s.verify(Some(&h), 1_000_000 + MAX_AGE_MS + 1, "b", "/_atoll/sync", b"body"),
            Err(AuthError::Stale(_))
        ));
        assert_eq!(s.verify(None, 1_000_000, "b", "/_atoll/sync", b"body"), Err(AuthError::Missing));
        assert_eq!(s.verify(Some("v2 12 zz 00"), 1_000_000, "b", "/", b""), Err(AuthError::Malformed));
        assert!(Secret::new("short").is_err());
    }

    #[test]
    fn an_answer_holds_for_the_request_it_answers_only() {
        let s = Secret::new("0123456789abcdef").expect("secret");
        // Two identical requests at the same millisecond still differ by their nonce.
        let first = s.sign(1_000_000, "b", "/_atoll/sync", b"round");
        let second = s.sign(1_000_000, "b", "/_atoll/sync", b"round");
        assert_ne!(first, second);
        let answer = s.sign(1_000_001, "", &Secret::reply_purpose(&first), b"in sync");
        assert!(s.verify(Some(&answer), 1_000_002, "", &Secret::reply_purpose(&first), b"in sync").is_ok());
        assert_eq!(
            s.verify(Some(&answer), 1_000_002, "", &Secret::reply_purpose(&second), b"in sync"),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn a_request_is_taken_once() {
        let s = Secret::new("0123456789abcdef").expect("secret");
        let replays = Replays::default();
        let h = s.sign(1_000_000, "b", "/_atoll/sync", b"push");
        let proof = s.verify(Some(&h), 1_000_000, "b", "/_atoll/sync", b"push").expect("valid");
        assert!(replays.first_time(proof, 1_000_000));
        assert!(!replays.first_time(proof, 1_000_100));
        let other = s.verify(
            Some(&s.sign(1_000_000, "b", "/_atoll/sync", b"push")),
            1_000_000,
            "b",
            "/_atoll/sync",
            b"push",
        );
        assert!(replays.first_time(other.expect("valid"), 1_000_100));
    }
}
