//! Proof of the shared peer secret (`ATOLL_PEER_SECRET`) on every sync message.
//!
//! The header `x-atoll-sync-auth: v3 <unix ms> <nonce> <length> <head tag> <tag>` carries two
//! HMAC-SHA256s truncated to 128 bits (as RFC 2104 allows; forging one is still a 2^128 guess),
//! keyed by the secret:
//! - the **head tag** covers `atoll-sync-v3-head \n <unix ms> \n <nonce> \n <recipient> \n
//!   <purpose> \n <length>`: a receiver checks it before reading any of the body, so a sender
//!   without the secret is refused without a byte of its body read, and a sender with it is
//!   read for exactly the length it signed;
//! - the **tag** covers the same fields and then the body itself.
//!
//! The fields:
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

/// What a valid proof says: when it was made, its nonce, and the length of its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    /// The signer's clock when it signed (ms since the Unix epoch).
    pub at_ms: u64,
    /// The message's random nonce.
    pub nonce: u64,
    /// The length of the body it was signed for.
    pub len: u64,
}

/// The shared secret: the one this site signs with, and during a rotation another one whose
/// proofs it accepts too.
#[derive(Clone)]
pub struct Secret {
    /// `keys[0]` signs; every key verifies.
    keys: Vec<Vec<u8>>,
}

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
    /// Not `v3 <ms> <nonce> <length> <hex> <hex>`.
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
        Ok(Secret { keys: vec![text.as_bytes().to_vec()] })
    }

    /// This secret, also accepting proofs made with `other` (`ATOLL_PEER_SECRET_ACCEPTED`, while
    /// the sites move from one secret to another): it still signs with its own.
    pub fn accepting(mut self, other: &str) -> anyhow::Result<Secret> {
        anyhow::ensure!(other.len() >= 16, "ATOLL_PEER_SECRET_ACCEPTED must be at least 16 characters");
        self.keys.push(other.as_bytes().to_vec());
        Ok(self)
    }

    fn mac(
        key: &[u8],
        head: bool,
        at_ms: u64,
        nonce: u64,
        to: &str,
        purpose: &str,
        len: usize,
    ) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        let kind = if head { "atoll-sync-v3-head" } else { "atoll-sync-v3" };
        mac.update(format!("{kind}\n{at_ms}\n{nonce:016x}\n{to}\n{purpose}\n{len}\n").as_bytes());
        mac
    }

    /// The header value proving `body` for `purpose`, sent to the site named `to` ("" when its
    /// name is not known yet), at `now_ms`, with a fresh nonce.
    pub fn sign(&self, now_ms: u64, to: &str, purpose: &str, body: &[u8]) -> String {
        self.sign_with(now_ms, fastrand::u64(..), to, purpose, body)
    }

    fn sign_with(&self, now_ms: u64, nonce: u64, to: &str, purpose: &str, body: &[u8]) -> String {
        let (len, key) = (body.len(), &self.keys[0]);
        let head = Self::mac(key, true, now_ms, nonce, to, purpose, len).finalize().into_bytes();
        let mut mac = Self::mac(key, false, now_ms, nonce, to, purpose, len);
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        format!("v3 {now_ms} {nonce:016x} {len} {} {}", hex(&head[..TAG_BYTES]), hex(&tag[..TAG_BYTES]))
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
        let (proof, key, tag) = self.parse_head(header, to, purpose)?;
        if proof.len != body.len() as u64 {
            return Err(AuthError::BadSignature);
        }
        let mut mac = Self::mac(key, false, proof.at_ms, proof.nonce, to, purpose, body.len());
        mac.update(body);
        mac.verify_truncated_left(&tag).map_err(|_| AuthError::BadSignature)?;
        Ok(proof)
    }

    /// Checks the head tag only, whatever the time: what a receiver may know before reading the
    /// body (who may send it, and how long it is).
    pub fn head(&self, header: Option<&str>, to: &str, purpose: &str) -> Result<Proof, AuthError> {
        self.parse_head(header, to, purpose).map(|(proof, _, _)| proof)
    }

    /// Parses a header and checks its head tag; returns the proof, the key whose head tag it is,
    /// and the tag.
    fn parse_head(
        &self,
        header: Option<&str>,
        to: &str,
        purpose: &str,
    ) -> Result<(Proof, &[u8], Vec<u8>), AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let mut parts = header.split(' ');
        let (Some("v3"), Some(at), Some(nonce), Some(len), Some(head), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(AuthError::Malformed);
        };
        let at: u64 = at.parse().map_err(|_| AuthError::Malformed)?;
        if nonce.len() != 16 {
            return Err(AuthError::Malformed);
        }
        let nonce = u64::from_str_radix(nonce, 16).map_err(|_| AuthError::Malformed)?;
        let len: usize = len.parse().map_err(|_| AuthError::Malformed)?;
        let (head, tag) = (unhex(head)?, unhex(tag)?);
        let key = self
            .keys
            .iter()
            .find(|key| {
                Self::mac(key, true, at, nonce, to, purpose, len).verify_truncated_left(&head).is_ok()
            })
            .ok_or(AuthError::BadSignature)?;
        Ok((Proof { at_ms: at, nonce, len: len as u64 }, key, tag))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>, AuthError> {
    if text.len() != 2 * TAG_BYTES || !text.is_ascii() {
        return Err(AuthError::Malformed);
    }
    (0..TAG_BYTES)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| AuthError::Malformed)
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

    /// Whether `nonce` was taken already (without taking it).
    pub fn seen(&self, nonce: u64) -> bool {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&nonce)
    }

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
        assert_eq!(s.verify(Some("v3 12 zz 0 00 00"), 1_000_000, "b", "/", b""), Err(AuthError::Malformed));
        assert!(Secret::new("short").is_err());
    }

    #[test]
    fn the_head_is_checked_without_the_body_and_binds_its_length() {
        let s = Secret::new("0123456789abcdef").expect("secret");
        let h = s.sign(1_000_000, "b", "/_atoll/sync", b"body");
        let head = s.head(Some(&h), "b", "/_atoll/sync").expect("head holds");
        assert_eq!((head.at_ms, head.len), (1_000_000, 4));
        assert_eq!(s.head(Some(&h), "c", "/_atoll/sync"), Err(AuthError::BadSignature));
        let other = Secret::new("fedcba9876543210").expect("secret");
        assert_eq!(other.head(Some(&h), "b", "/_atoll/sync"), Err(AuthError::BadSignature));
        // A longer body under the same head: the length it signed differs.
        let longer = h.replacen(" 4 ", " 5 ", 1);
        assert_eq!(s.head(Some(&longer), "b", "/_atoll/sync"), Err(AuthError::BadSignature));
        assert_eq!(
            s.verify(Some(&h), 1_000_000, "b", "/_atoll/sync", b"body!"),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn during_a_rotation_both_secrets_are_accepted_and_the_own_one_signs() {
        let (old, new) = ("old-secret-0123456789", "new-secret-0123456789");
        let rotating = Secret::new(new).and_then(|s| s.accepting(old)).expect("secret");
        let by_old = Secret::new(old).expect("secret").sign(1_000_000, "b", "/p", b"x");
        assert!(rotating.verify(Some(&by_old), 1_000_000, "b", "/p", b"x").is_ok());
        let by_rotating = rotating.sign(1_000_000, "b", "/p", b"x");
        assert!(
            Secret::new(new).expect("secret").verify(Some(&by_rotating), 1_000_000, "b", "/p", b"x").is_ok()
        );
        assert_eq!(
            Secret::new(old).expect("secret").verify(Some(&by_rotating), 1_000_000, "b", "/p", b"x"),
            Err(AuthError::BadSignature),
            "it signs with its own secret"
        );
        assert!(Secret::new(new).and_then(|s| s.accepting("short")).is_err());
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
