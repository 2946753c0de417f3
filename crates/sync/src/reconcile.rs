//! Anti-entropy rounds: the pure core of reconciliation.
//!
//! Both sides run the same step, [`process`]: take the other side's [`Round`], merge the entries
//! it carries, and answer everything it asks with a new round. The initiator starts a session
//! with the root's children ([`start`]) and keeps sending rounds until its answer is empty. Only
//! subtrees whose digests differ are descended into, so the cost follows the difference, not the
//! data; see ALGORITHM.md for the argument and the byte counts.

use std::collections::{HashMap, HashSet};

use anyhow::Result;

use crate::message::{
    FANOUT, LEAF_LEVEL, LeafItems, MAX_ENTRIES, NodeDigests, Round, Wants, WireEntry, pack, unpack,
};
use crate::store::SyncStore;

/// How much one round may carry.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Bytes of entries; past it, leaves are deferred to a later round.
    pub entry_bytes: usize,
    /// Fingerprints listed; past it, leaves are sent as digests only.
    pub fingerprints: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { entry_bytes: 8 << 20, fingerprints: 2_000_000 }
    }
}

/// What one step moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Entries received that changed this store.
    pub merged: usize,
    /// Entries received.
    pub received: usize,
    /// Entries put in the answer.
    pub sent: usize,
    /// The newest change among the entries received (unix ms of its HLC).
    pub newest_ms: Option<u64>,
}

/// The digest tree over the leaf ranges: level 0 is the root, level [`LEAF_LEVEL`] the leaves;
/// each node's digest is the wrapping sum of its children's (the low 64 bits of the range sums).
#[derive(Debug, Clone)]
pub struct Tree {
    levels: Vec<Vec<u64>>,
}

impl Tree {
    /// The tree over these leaf digests (atoll-kv's range digests).
    pub fn new(leaves: &[u128]) -> Tree {
        let mut levels = vec![leaves.iter().map(|&d| d as u64).collect::<Vec<u64>>()];
        while levels[0].len() > 1 {
            let above =
                levels[0].chunks(FANOUT).map(|c| c.iter().fold(0u64, |a, &d| a.wrapping_add(d))).collect();
            levels.insert(0, above);
        }
        Tree { levels }
    }

    /// The digest of node `index` at `level`.
    pub fn node(&self, level: u8, index: usize) -> u64 {
        self.levels[usize::from(level)][index]
    }

    /// The digests of the children of node `index` at `level`.
    pub fn children(&self, level: u8, index: usize) -> Vec<u64> {
        self.levels[usize::from(level) + 1][index * FANOUT..(index + 1) * FANOUT].to_vec()
    }
}

/// A 32-bit fingerprint of an entry hash, salted per session so that a collision in one
/// session is not repeated in the next.
pub fn fingerprint(hash: u128, salt: u32) -> u32 {
    let mut x = (hash as u64)
        ^ ((hash >> 64) as u64).rotate_left(29)
        ^ u64::from(salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64's finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 32) as u32
}

/// The first round of a session: the sender's digests of the root's children.
pub fn start(store: &impl SyncStore, salt: u32) -> Result<Round> {
    let tree = Tree::new(&store.leaf_digests()?);
    Ok(Round { salt, nodes: vec![NodeDigests::new(0, 0, &tree.children(0, 0))], ..Round::default() })
}

/// What one step may do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The size of what it sends.
    pub budget: Budget,
    /// Entries changed at or after this (past this site's clock bound) fail the step, merging
    /// nothing.
    pub refuse_from: atoll_kv::Hlc,
    /// Merge what the other side sends (not while it resyncs).
    pub take: bool,
}

/// One step: merge what `incoming` carries (if `limits.take`) and answer what it asks.
pub async fn process(store: &impl SyncStore, incoming: Round, limits: Limits) -> Result<(Round, Moved)> {
    let Limits { budget, refuse_from, take } = limits;
    // Merge first, so that the answer reflects what was just received.
    let received = if take { crate::message::entries(incoming.entries) } else { Vec::new() };
    let received_count = received.len();
    let newest_ms = received.iter().map(|(_, e)| e.changed.hlc.physical_ms).max();
    let merged = store.merge(received, refuse_from).await?;
    let tree = Tree::new(&store.leaf_digests()?);
    let mut step = Step {
        store,
        tree: &tree,
        out: Round { salt: incoming.salt, ..Round::default() },
        budget,
        items: HashMap::new(),
        offered: HashSet::new(),
        moved: Moved { merged, received: received_count, sent: 0, newest_ms },
    };
    for node in &incoming.nodes {
        let child_level = node.level + 1;
        for (c, theirs) in node.children().enumerate() {
            let child = usize::from(node.index) * FANOUT + c;
            if tree.node(child_level, child) == theirs {
                continue;
            }
            if child_level == LEAF_LEVEL {
                step.offer(child as u16)?;
            } else {
                let children = tree.children(child_level, child);
                step.out.nodes.push(NodeDigests::new(child_level, child as u16, &children));
            }
        }
    }
    for &(leaf, theirs) in &incoming.leaves {
        if tree.node(LEAF_LEVEL, usize::from(leaf)) != theirs {
            step.offer(leaf)?;
        }
    }
    for list in &incoming.items {
        step.compare(list)?;
    }
    for wants in &incoming.wants {
        step.answer(wants)?;
    }
    Ok((step.out, step.moved))
}

struct Step<'a, S> {
    store: &'a S,
    tree: &'a Tree,
    out: Round,
    budget: Budget,
    items: HashMap<u16, Vec<(Vec<u8>, u128)>>,
    /// Leaves whose items (or digest) are already in `out`.
    offered: HashSet<u16>,
    moved: Moved,
}

impl<S: SyncStore> Step<'_, S> {
    fn items(&mut self, leaf: u16) -> Result<&Vec<(Vec<u8>, u128)>> {
        if !self.items.contains_key(&leaf) {
            let items = self.store.leaf_items(u32::from(leaf))?;
            self.items.insert(leaf, items);
        }
        Ok(&self.items[&leaf])
    }

    /// Tells the other side what this site has in `leaf`: every fingerprint if there is room,
    /// else the leaf's digest (the other side then lists its own).
    fn offer(&mut self, leaf: u16) -> Result<()> {
        if !self.offered.insert(leaf) {
            return Ok(());
        }
        let salt = self.out.salt;
        let n = self.items(leaf)?.len();
        if n <= self.budget.fingerprints {
            self.budget.fingerprints -= n;
            let fingerprints = pack(self.items(leaf)?.iter().map(|(_, h)| fingerprint(*h, salt)));
            self.out.items.push(LeafItems { leaf, fingerprints });
        } else {
            self.out.leaves.push((leaf, self.tree.node(LEAF_LEVEL, usize::from(leaf))));
        }
        Ok(())
    }

    /// The other side listed `list`: send what it lacks, ask for what this site lacks.
    fn compare(&mut self, list: &LeafItems) -> Result<()> {
        if self.full() {
            return self.offer(list.leaf);
        }
        let salt = self.out.salt;
        let theirs: HashSet<u32> = unpack(&list.fingerprints).collect();
        let mine: Vec<(Vec<u8>, u32)> =
            self.items(list.leaf)?.iter().map(|(k, h)| (k.clone(), fingerprint(*h, salt))).collect();
        let mine_fps: HashSet<u32> = mine.iter().map(|(_, f)| *f).collect();
        let missing: Vec<u32> = theirs.iter().copied().filter(|f| !mine_fps.contains(f)).collect();
        if !missing.is_empty() {
            self.out.wants.push(Wants { leaf: list.leaf, fingerprints: pack(missing) });
        }
        let extra: Vec<Vec<u8>> =
            mine.into_iter().filter(|(_, f)| !theirs.contains(f)).map(|(k, _)| k).collect();
        self.send(list.leaf, &extra)
    }

    /// The other side asked for `wants`.
    fn answer(&mut self, wants: &Wants) -> Result<()> {
        if self.full() {
            return self.offer(wants.leaf);
        }
        let salt = self.out.salt;
        let wanted: HashSet<u32> = unpack(&wants.fingerprints).collect();
        let keys: Vec<Vec<u8>> = self
            .items(wants.leaf)?
            .iter()
            .filter(|(_, h)| wanted.contains(&fingerprint(*h, salt)))
            .map(|(k, _)| k.clone())
            .collect();
        self.send(wants.leaf, &keys)
    }

    fn full(&self) -> bool {
        self.budget.entry_bytes == 0 || self.out.entries.len() >= MAX_ENTRIES / 2
    }

    /// Puts the entries of `keys` (all in `leaf`) in the answer; if the budget runs out first,
    /// offers the leaf instead, so that the rest follows in a later round.
    /// The budget holds as the round is assembled: entries are read a few at a time and the
    /// round stops growing once it is spent (one entry always fits: values are bounded well below
    /// the budget), so a leaf of large values takes several rounds instead of one oversized message.
    fn send(&mut self, leaf: u16, keys: &[Vec<u8>]) -> Result<()> {
        for chunk in keys.chunks(4) {
            if self.full() {
                return self.offer(leaf);
            }
            for (key, entry) in self.store.entries_at(chunk)? {
                let wire = WireEntry::new(key, &entry);
                if wire.size() > self.budget.entry_bytes && !self.out.entries.is_empty() {
                    self.budget.entry_bytes = 0;
                    return self.offer(leaf);
                }
                self.budget.entry_bytes = self.budget.entry_bytes.saturating_sub(wire.size());
                self.out.entries.push(wire);
                self.moved.sent += 1;
            }
        }
        Ok(())
    }
}
