//! The sync protocol's messages and their wire format.
//!
//! A message on the wire is one byte of protocol version ([`PROTOCOL_VERSION`]) followed by the
//! postcard encoding of a [`Request`] or a [`Reply`]. Entries inside are kept in atoll-kv's own
//! versioned entry codec and decoded (and so validated) before anything is merged. [`decode`]
//! checks the size bound first and refuses trailing bytes, unknown versions and every malformed
//! field with a [`MessageError`]; it never panics (see `fuzz/` and the decoder property test).

use atoll_kv::{Entry, Hlc};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 3;
/// The largest message accepted, in bytes.
pub const MAX_MESSAGE: usize = 32 << 20;
/// Most entries in one message.
pub const MAX_ENTRIES: usize = 200_000;
/// Children per node of the digest tree.
pub const FANOUT: usize = 16;
/// Depth of the leaves: 16^3 = 4096 leaves, one per atoll-kv digest range.
pub const LEAF_LEVEL: u8 = 3;

/// A site as peers know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The site's name (its id in stamps).
    pub site: String,
    /// Its region.
    pub region: String,
    /// The base URL its sync endpoints are reached at.
    pub url: String,
}

/// A site introducing itself; sent by the caller and answered in kind (or refused: see
/// [`Reply`]). Besides names and addresses it carries what peers need to tell a restart from a
/// restore and to bound clocks (see ALGORITHM.md, "Identity" and "Clocks").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender.
    pub me: PeerInfo,
    /// Every other site the sender knows (membership spreads by these lists).
    pub peers: Vec<PeerInfo>,
    /// The sender's wall clock (unix ms) when it sent this: peers measure their offset to it.
    pub wall_ms: u64,
    /// The sender's data dir incarnation.
    pub incarnation: u64,
    /// The incarnation it replaced after learning it ran on an older copy of its data dir (0: none).
    pub previous_incarnation: u64,
    /// How many times the sender's store was opened.
    pub boot: u64,
    /// A random id of the sender's current boot (two copies of a data dir opened with the same
    /// boot count differ by it).
    pub boot_nonce: u64,
    /// The sender's durable clock when this boot opened its store.
    pub opened_at: (u64, u32),
    /// The sender's recent boots, oldest first, this one last (its lineage): a peer that knew an
    /// earlier boot checks the boot after it (see ALGORITHM.md, "Membership and identity").
    pub boots: Vec<BootSeen>,
    /// The sender's durable clock now: at least every stamp it has sent.
    pub durable: (u64, u32),
    /// How far back the sender's data reaches (its creation, or the watermark it resynced from).
    pub since: (u64, u32),
    /// The sender is resyncing: its entries are not merged until it has finished.
    pub resyncing: bool,
    /// What the sender has seen of the other sites' incarnations: a site that was away learns
    /// from it to recognise an older copy of a third site (witness gossip).
    pub seen: Vec<Seen>,
}

/// One boot of a site's store (see [`Hello::boots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSeen {
    /// The boot count.
    pub boot: u64,
    /// Its random id.
    pub nonce: u64,
    /// The durable clock when it opened the store.
    pub opened_at: (u64, u32),
}

/// What one site has seen of another's incarnation (see [`Hello::seen`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The site's name.
    pub site: String,
    /// The incarnation.
    pub incarnation: u64,
    /// The highest boot seen.
    pub boot: u64,
    /// That boot's random id.
    pub boot_nonce: u64,
    /// Its clock at open in that boot.
    pub opened_at: (u64, u32),
    /// The highest durable clock it reported.
    pub durable: (u64, u32),
}

/// Who sent a push or a reconcile round: a site name and its incarnation, with its durable clock
/// (what peers remember to recognise an older copy of it later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// The site's name.
    pub site: String,
    /// Its data dir incarnation.
    pub incarnation: u64,
    /// Its boot count (a receiver that has not heard this boot's hello asks for one).
    pub boot: u64,
    /// Its boot's random id.
    pub boot_nonce: u64,
    /// Its durable clock when it sent this.
    pub durable: (u64, u32),
    /// It is resyncing: what it sends is not merged until it has finished (see ALGORITHM.md,
    /// "Horizon").
    pub resyncing: bool,
    /// How far back its data reaches (a message from before a resync is refused).
    pub since: (u64, u32),
}

/// One key's entry on the wire: the composite key and the entry in atoll-kv's codec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// The composite key (app, bucket, key).
    pub key: Vec<u8>,
    /// `atoll_kv::codec::encode` of the entry.
    pub entry: Vec<u8>,
}

impl WireEntry {
    /// Encodes an entry.
    pub fn new(key: Vec<u8>, entry: &Entry) -> WireEntry {
        WireEntry { key, entry: atoll_kv::codec::encode(entry) }
    }

    /// The bytes this entry adds to a message (about).
    pub fn size(&self) -> usize {
        self.key.len() + self.entry.len() + 8
    }
}

/// The sender's digests of the children of one interior node of the digest tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDigests {
    /// The node's level (0 = root).
    pub level: u8,
    /// The node's index within its level.
    pub index: u16,
    /// The digests of its [`FANOUT`] children, 8 bytes each, little-endian (packed: postcard
    /// would spend 10 bytes on a random u64).
    pub children: Vec<u8>,
}

impl NodeDigests {
    /// A node's children digests, packed.
    pub fn new(level: u8, index: u16, children: &[u64]) -> NodeDigests {
        NodeDigests { level, index, children: children.iter().flat_map(|d| d.to_le_bytes()).collect() }
    }

    /// The children digests.
    pub fn children(&self) -> impl Iterator<Item = u64> + '_ {
        self.children.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
    }
}

/// The sender's fingerprints of every item in one leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafItems {
    /// The leaf (an atoll-kv digest range).
    pub leaf: u16,
    /// One salted 32-bit fingerprint per entry, 4 bytes each (packed).
    pub fingerprints: Vec<u8>,
}

/// Fingerprints the sender wants the entries of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wants {
    /// The leaf they are in.
    pub leaf: u16,
    /// Their fingerprints, 4 bytes each (packed).
    pub fingerprints: Vec<u8>,
}

/// Packs 32-bit fingerprints.
pub fn pack(fingerprints: impl IntoIterator<Item = u32>) -> Vec<u8> {
    fingerprints.into_iter().flat_map(u32::to_le_bytes).collect()
}

/// Unpacks 32-bit fingerprints (a validated message has a multiple of 4 bytes).
pub fn unpack(packed: &[u8]) -> impl Iterator<Item = u32> + '_ {
    packed.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default()))
}

/// One round of anti-entropy, either way (see ALGORITHM.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// The session's fingerprint salt, chosen by the initiator.
    pub salt: u32,
    /// "Here are my digests of these nodes' children."
    pub nodes: Vec<NodeDigests>,
    /// "Here is my digest of this leaf" (a leaf the sender had no room to list).
    pub leaves: Vec<(u16, u64)>,
    /// "Here is everything I have in this leaf."
    pub items: Vec<LeafItems>,
    /// "Send me these."
    pub wants: Vec<Wants>,
    /// "Merge these."
    pub entries: Vec<WireEntry>,
}

impl Round {
    /// Whether the round asks or carries nothing.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.leaves.is_empty()
            && self.items.is_empty()
            && self.wants.is_empty()
            && self.entries.is_empty()
    }
}

/// What one site asks of another, at `POST /_atoll/sync/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Introduce yourself.
    Hello(Hello),
    /// Fresh writes from the sender.
    Push(Sender, Vec<WireEntry>),
    /// One round of an anti-entropy session the sender leads.
    Reconcile(Sender, Round),
    /// Fresh writes from the sender, after which the receiver holds every write the sender made
    /// with a stamp at or before [`Covered::through`] (its frontier there; see
    /// `crate::frontier`). With no entries: the end of an anti-entropy session the sender led.
    /// Sites older than this variant refuse it (the sender then pushes without it).
    PushCovered(Sender, Vec<WireEntry>, Covered),
}

/// What a [`Request::PushCovered`] says, and the state of the receiver it holds for: the
/// receiver as the sender last heard it say hello. A receiver that has lost data since (a
/// restore, a resync) is another boot or reaches back less far, and takes no frontier from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Covered {
    /// Every write of the sender's stamped at or before this is merged at the receiver.
    pub through: (u64, u32),
    /// The receiver's incarnation.
    pub incarnation: u64,
    /// The receiver's boot.
    pub boot_nonce: u64,
    /// How far back the receiver's data reached.
    pub since: (u64, u32),
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The receiver introduces itself.
    Hello(Hello),
    /// How many pushed entries changed the receiver.
    Pushed(u32),
    /// The receiver's round.
    Reconcile(Round),
    /// The receiver will not take entries from the sender until it resyncs from this collection
    /// watermark (its data reaches back further; see ALGORITHM.md, "Tombstones").
    ResyncRequired {
        /// The receiver's collection watermark.
        watermark: (u64, u32),
        /// The sender was cut off past the horizon (not counted when tombstones were
        /// collected): none of its increments on what it discards are made again.
        uncounted: bool,
        /// Who answers: the receiver's name and incarnation (a site whose data it merged within
        /// the horizon is not obeyed; see ALGORITHM.md, "Horizon").
        site: String,
        /// The receiver's incarnation.
        incarnation: u64,
        /// The receiver's horizon (ms): how long it waits before cutting a silent site off.
        horizon_ms: u64,
    },
    /// The receiver does not know the sender (or this incarnation of it): say hello first.
    Introduce,
    /// The receiver has seen a newer state of the sender's incarnation than the sender holds: the
    /// sender runs on an older copy of its data dir and must take a new incarnation.
    Reincarnate,
    /// The receiver refuses the sender, for the reason given (two live sites with one name).
    Refused(String),
    /// The receiver merged nothing: an entry was stamped past its clock bound (the reason says
    /// by how much).
    AheadOfClock(String),
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Empty body.
    #[error("empty sync message")]
    Empty,
    /// A version this build does not speak.
    #[error("sync protocol version {0} is not supported (this site speaks version {PROTOCOL_VERSION})")]
    UnknownVersion(u8),
    /// Over [`MAX_MESSAGE`].
    #[error("sync message of {0} bytes is over the limit of {MAX_MESSAGE}")]
    TooLarge(usize),
    /// Not a valid message.
    #[error("malformed sync message: {0}")]
    Malformed(String),
}

/// Encodes a message with its version byte.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut out = vec![PROTOCOL_VERSION];
    // Serialising these plain types into a Vec cannot fail.
    out.extend(postcard::to_stdvec(message).unwrap_or_default());
    out
}

/// Decodes and validates a message: size, version, structure, and every entry inside.
pub fn decode<T: for<'de> Deserialize<'de> + Validate>(bytes: &[u8]) -> Result<T, MessageError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    let (&version, body) = bytes.split_first().ok_or(MessageError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(MessageError::UnknownVersion(version));
    }
    let (message, rest): (T, _) =
        postcard::take_from_bytes(body).map_err(|e| MessageError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(MessageError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    message.validate().map_err(MessageError::Malformed)?;
    Ok(message)
}

/// Checks beyond the structure: bounds, tree coordinates, entries.
pub trait Validate {
    /// `Err(reason)` when the message must be refused.
    fn validate(&self) -> Result<(), String>;
}

impl Validate for Request {
    fn validate(&self) -> Result<(), String> {
        match self {
            Request::Hello(h) => validate_hello(h),
            Request::Push(from, entries) | Request::PushCovered(from, entries, _) => {
                validate_site(&from.site).and_then(|()| validate_entries(entries))
            }
            Request::Reconcile(from, round) => validate_site(&from.site).and_then(|()| validate_round(round)),
        }
    }
}

impl Validate for Reply {
    fn validate(&self) -> Result<(), String> {
        match self {
            Reply::Hello(h) => validate_hello(h),
            Reply::Reconcile(round) => validate_round(round),
            Reply::Refused(reason) | Reply::AheadOfClock(reason) if reason.len() > 4096 => {
                Err("a refusal's reason is too long".into())
            }
            Reply::ResyncRequired { site, .. } if site.is_empty() || site.len() > 255 => {
                Err("a resync demand's site name is empty or too long".into())
            }
            Reply::Pushed(_)
            | Reply::ResyncRequired { .. }
            | Reply::Introduce
            | Reply::Reincarnate
            | Reply::Refused(_)
            | Reply::AheadOfClock(_) => Ok(()),
        }
    }
}

fn validate_hello(h: &Hello) -> Result<(), String> {
    if h.peers.len() > 1000 || h.seen.len() > 1000 {
        return Err("too many peers".into());
    }
    if h.seen.iter().any(|s| s.site.is_empty() || s.site.len() > 255) {
        return Err("a seen site's name is empty or too long".into());
    }
    for p in std::iter::once(&h.me).chain(&h.peers) {
        if p.site.is_empty() || p.site.len() > 255 || p.region.len() > 255 || p.url.len() > 2048 {
            return Err("a peer's site, region or url is empty or too long".into());
        }
    }
    Ok(())
}

fn validate_site(site: &str) -> Result<(), String> {
    if site.is_empty() || site.len() > 255 {
        Err("the sender's site name is empty or too long".into())
    } else {
        Ok(())
    }
}

fn validate_entries(entries: &[WireEntry]) -> Result<(), String> {
    if entries.len() > MAX_ENTRIES {
        return Err(format!("{} entries, over the limit of {MAX_ENTRIES}", entries.len()));
    }
    for e in entries {
        if atoll_kv::Namespace::split(&e.key).is_none() {
            return Err("an entry's key is not a valid composite key".into());
        }
        atoll_kv::codec::decode(&e.entry).map_err(|err| format!("an entry does not decode: {err}"))?;
    }
    Ok(())
}

fn validate_round(r: &Round) -> Result<(), String> {
    let leaves = atoll_kv::DIGEST_RANGES as usize;
    for n in &r.nodes {
        if n.level >= LEAF_LEVEL || usize::from(n.index) >= FANOUT.pow(u32::from(n.level)) {
            return Err(format!("no tree node at level {} index {}", n.level, n.index));
        }
        if n.children.len() != FANOUT * 8 {
            return Err(format!(
                "a node has {} bytes of child digests, not {}",
                n.children.len(),
                FANOUT * 8
            ));
        }
    }
    let lists = r.items.iter().map(|i| &i.fingerprints).chain(r.wants.iter().map(|w| &w.fingerprints));
    for list in lists {
        if list.len() % 4 != 0 {
            return Err("a fingerprint list is not a whole number of 4-byte fingerprints".into());
        }
    }
    let leaf_ids = r
        .leaves
        .iter()
        .map(|l| l.0)
        .chain(r.items.iter().map(|i| i.leaf))
        .chain(r.wants.iter().map(|w| w.leaf));
    for leaf in leaf_ids {
        if usize::from(leaf) >= leaves {
            return Err(format!("no leaf {leaf}"));
        }
    }
    validate_entries(&r.entries)
}

/// How far a clock that read `theirs` is ahead of one that read `ours` at the same moment (ms;
/// negative: behind).
pub fn offset_ms(theirs: u64, ours: u64) -> i64 {
    i64::try_from(theirs).unwrap_or(i64::MAX).saturating_sub(i64::try_from(ours).unwrap_or(i64::MAX))
}

/// An HLC as sent on the wire.
pub fn hlc_wire(h: Hlc) -> (u64, u32) {
    (h.physical_ms, h.logical)
}

/// An HLC from the wire.
pub fn hlc_from_wire((physical_ms, logical): (u64, u32)) -> Hlc {
    Hlc { physical_ms, logical }
}

/// Decodes the entries of a validated message.
pub fn entries(wire: Vec<WireEntry>) -> Vec<(Vec<u8>, Entry)> {
    wire.into_iter().filter_map(|w| atoll_kv::codec::decode(&w.entry).ok().map(|e| (w.key, e))).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> Request {
        let entry = Entry::set(
            b"v".to_vec(),
            atoll_kv::Stamp { hlc: Hlc { physical_ms: 5, logical: 1 }, site: "a".into() },
        );
        let key = atoll_kv::Namespace::new("app", "b", &atoll_kv::Bounds::default()).expect("ns").key(b"k");
        Request::Reconcile(
            Sender {
                site: "a".into(),
                incarnation: 1,
                boot: 1,
                boot_nonce: 9,
                durable: (5, 1),
                resyncing: false,
                since: (1, 0),
            },
            Round {
                salt: 7,
                nodes: vec![NodeDigests::new(1, 3, &[9; FANOUT])],
                leaves: vec![(12, 34)],
                items: vec![LeafItems { leaf: 4095, fingerprints: pack([1, 2, 3]) }],
                wants: vec![Wants { leaf: 0, fingerprints: pack([4]) }],
                entries: vec![WireEntry::new(key, &entry)],
            },
        )
    }

    #[test]
    fn a_message_round_trips_and_each_kind_of_bad_message_is_named() {
        let bytes = encode(&sample());
        assert_eq!(decode::<Request>(&bytes), Ok(sample()));
        assert_eq!(decode::<Request>(&[]), Err(MessageError::Empty));
        let mut future = bytes.clone();
        future[0] = 1;
        assert_eq!(decode::<Request>(&future), Err(MessageError::UnknownVersion(1)));
        assert_eq!(
            decode::<Request>(&vec![1; MAX_MESSAGE + 1]),
            Err(MessageError::TooLarge(MAX_MESSAGE + 1))
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(
            matches!(decode::<Request>(&trailing), Err(MessageError::Malformed(m)) if m.contains("trailing"))
        );
        assert!(matches!(decode::<Request>(&bytes[..bytes.len() - 1]), Err(MessageError::Malformed(_))));
    }

    #[test]
    fn out_of_tree_coordinates_and_bad_entries_are_refused() {
        let Request::Reconcile(from, round) = sample() else { unreachable!() };
        let refused = |round: Round| {
            let bytes = encode(&Request::Reconcile(from.clone(), round));
            matches!(decode::<Request>(&bytes), Err(MessageError::Malformed(_)))
        };
        assert!(refused(Round { nodes: vec![NodeDigests::new(3, 0, &[0; FANOUT])], ..round.clone() }));
        assert!(refused(Round { nodes: vec![NodeDigests::new(1, 16, &[0; FANOUT])], ..round.clone() }));
        assert!(refused(Round { nodes: vec![NodeDigests::new(0, 0, &[0; 3])], ..round.clone() }));
        assert!(refused(Round { leaves: vec![(4096, 0)], ..round.clone() }));
        assert!(refused(Round {
            items: vec![LeafItems { leaf: 1, fingerprints: vec![1, 2, 3] }],
            ..round.clone()
        }));
        let mut bad_entry = round.clone();
        bad_entry.entries[0].entry[0] = 99; // an entry codec version that does not exist
        assert!(refused(bad_entry));
        let mut bad_key = round.clone();
        bad_key.entries[0].key = vec![200];
        assert!(refused(bad_key));
    }

    proptest! {
        #[test]
        fn the_decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Reply>(&bytes);
        }

        #[test]
        fn the_decoder_never_panics_on_mutated_messages(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&sample());
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let n = cut.index(bytes.len() + 1);
            if let Ok(decoded) = decode::<Request>(&bytes[..n]) {
                prop_assert_eq!(decode::<Request>(&encode(&decoded)), Ok(decoded));
            }
        }
    }
}
