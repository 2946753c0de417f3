//! Property tests of the merge rule: replicas that saw the same changes, in any order and with any
//! duplication, hold the same entry; concurrent increments are never lost.

use atoll_kv::{Entry, Hlc, Read, Stamp};
use proptest::prelude::*;

const SITES: [&str; 3] = ["ap-south", "eu-west", "us-east"];

#[derive(Debug, Clone)]
enum Op {
    Set(u8),
    Delete,
    Increment(i8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![any::<u8>().prop_map(Op::Set), Just(Op::Delete), any::<i8>().prop_map(Op::Increment)]
}

/// One step: at `site`, first merge what `sync_from` holds (if any), then apply `op` with the
/// site's clock, whose wall time is the step number plus a skew (clocks disagree).
#[derive(Debug, Clone)]
struct Step {
    site: usize,
    sync_from: Option<usize>,
    op: Op,
    skew: u8,
}

fn step() -> impl Strategy<Value = Step> {
    (0..3usize, prop::option::of(0..3usize), op(), any::<u8>()).prop_map(|(site, sync_from, op, skew)| Step {
        site,
        sync_from,
        op,
        skew,
    })
}

/// Runs a history; returns every state any replica held, and the increments that were accepted.
fn run(steps: &[Step]) -> (Vec<Entry>, Vec<i64>) {
    let mut replicas = vec![Entry::absent(); 3];
    let mut clocks = [Hlc::ZERO; 3];
    let mut states = Vec::new();
    let mut accepted = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        if let Some(from) = s.sync_from {
            let merged = replicas[s.site].merge(&replicas[from]);
            // A site that receives a change observes its clock (as the store does).
            clocks[s.site] = clocks[s.site].max(merged.changed.hlc);
            replicas[s.site] = merged;
        }
        let wall = (i as u64) * 10 + u64::from(s.skew);
        let last = clocks[s.site];
        let hlc = if wall > last.physical_ms {
            Hlc { physical_ms: wall, logical: 0 }
        } else {
            Hlc { physical_ms: last.physical_ms, logical: last.logical + 1 }
        };
        clocks[s.site] = hlc;
        let stamp = Stamp { hlc, site: SITES[s.site].into() };
        let current = &replicas[s.site];
        replicas[s.site] = match &s.op {
            Op::Set(v) => Entry::set(vec![*v], stamp),
            Op::Delete => Entry::delete(stamp),
            Op::Increment(d) => match current.increment(i64::from(*d), stamp) {
                Ok((next, _)) => {
                    accepted.push(i64::from(*d));
                    next
                }
                Err(_) => current.clone(),
            },
        };
        states.push(replicas[s.site].clone());
    }
    (states, accepted)
}

fn fold(entries: &[Entry]) -> Entry {
    entries.iter().fold(Entry::absent(), |acc, e| acc.merge(e))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn merge_is_commutative_associative_idempotent(steps in prop::collection::vec(step(), 1..40)) {
        let (states, _) = run(&steps);
        for a in &states {
            prop_assert_eq!(a.merge(a), a.clone());
            for b in &states {
                prop_assert_eq!(a.merge(b), b.merge(a));
            }
        }
        for w in states.windows(3) {
            prop_assert_eq!(w[0].merge(&w[1]).merge(&w[2]), w[0].merge(&w[1].merge(&w[2])));
        }
    }

    #[test]
    fn any_order_and_duplication_gives_the_same_state(
        steps in prop::collection::vec(step(), 1..40),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..120),
    ) {
        let (states, _) = run(&steps);
        let expected = fold(&states);
        // Deliver the states in a random order with random repeats, then each once more (so
        // every state arrives at least once).
        let mut delivered: Vec<Entry> = order.iter().map(|i| states[i.index(states.len())].clone()).collect();
        delivered.extend(states.iter().rev().cloned());
        prop_assert_eq!(fold(&delivered), expected);
    }

    #[test]
    fn increments_without_sets_sum_exactly(
        steps in prop::collection::vec((0..3usize, prop::option::of(0..3usize), any::<i8>(), any::<u8>()), 1..60),
    ) {
        let steps: Vec<Step> = steps
            .into_iter()
            .map(|(site, sync_from, d, skew)| Step { site, sync_from, op: Op::Increment(d), skew })
            .collect();
        let (states, accepted) = run(&steps);
        let total: i64 = accepted.iter().sum();
        let expected = if accepted.is_empty() { Read::Absent } else { Read::Number(total) };
        let merged = fold(&states);
        prop_assert_eq!(merged.read(), expected);
    }
}
