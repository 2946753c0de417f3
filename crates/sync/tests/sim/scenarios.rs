//! Scenario tests: a quiet network and explicit steps, each pinning one rule.

use super::*;

/// Scenario helpers: a quiet network, explicit steps.
impl Sim {
    fn quiet(n: usize, config: NodeConfig) -> Sim {
        assert!((3..=5).contains(&n), "simulations have 3 to 5 sites");
        let mut seed = 0;
        let sim = loop {
            // Pick a seed that gives `n` sites.
            let sim = Sim::new(seed, config.clone());
            if sim.n == n {
                break sim;
            }
            seed += 1;
        };
        sim.net.lossy.store(false, Ordering::Relaxed);
        sim
    }

    async fn set(&mut self, i: usize, key: &str, value: &str) {
        let ns = self.ns();
        let w = self.sites[i].store.write(&ns, key.as_bytes(), Write::Set(value.as_bytes().to_vec())).await;
        assert_eq!(w, Ok(Written::Done));
        self.drain_feeds();
    }

    async fn delete(&mut self, i: usize, key: &str) {
        let ns = self.ns();
        assert_eq!(self.sites[i].store.write(&ns, key.as_bytes(), Write::Delete).await, Ok(Written::Done));
        self.drain_feeds();
    }

    async fn increment(&mut self, i: usize, key: &str, delta: i64) {
        let ns = self.ns();
        let w = self.sites[i].store.write(&ns, key.as_bytes(), Write::Increment(delta)).await;
        assert!(matches!(w, Ok(Written::Total(_))), "{w:?}");
        self.drain_feeds();
    }

    /// Cuts site `away` off from the others, runs sessions and collection among them past the
    /// horizon until the tombstones are collected, and lets it back; returns how many went.
    async fn collect_without(&mut self, away: usize) -> usize {
        let others: Vec<usize> = (0..self.n).filter(|&i| i != away).collect();
        for &i in &others {
            self.cut(i, away);
        }
        let mut collected = 0;
        for _ in 0..20 {
            self.advance(3_000);
            for &i in &others {
                for &j in &others {
                    if i != j {
                        self.sync(i, j).await.expect("sync");
                    }
                }
            }
            for &i in &others {
                collected += self.sites[i].node.collect(self.now()).expect("collect");
            }
        }
        collected
    }

    /// Five rounds of sessions over `pairs`, each followed by time for them to mature and a
    /// collection everywhere; returns how many tombstones each site collected.
    async fn rounds(&mut self, pairs: &[(usize, usize)]) -> Vec<usize> {
        let mut collected = vec![0; self.n];
        for _ in 0..5 {
            for &(i, j) in pairs {
                self.sync(i, j).await.expect("sync");
            }
            self.advance(MAX_AGE_MS + 1);
            for (i, c) in collected.iter_mut().enumerate() {
                *c += self.sites[i].node.collect(self.now()).expect("collect");
            }
        }
        collected
    }

    fn get(&self, i: usize, key: &str) -> Option<String> {
        let got = self.sites[i].store.get(&self.ns(), key.as_bytes()).expect("get");
        got.map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Site i says hello to and runs anti-entropy with site j.
    async fn sync(&self, i: usize, j: usize) -> Result<usize> {
        self.session(i, &url(j), 7).await
    }

    fn cut(&self, i: usize, j: usize) {
        self.net.cut.lock().unwrap().insert((i.min(j), i.max(j)));
    }

    fn advance(&self, ms: u64) {
        self.net.now.fetch_add(ms, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_tombstone_stays_until_every_known_site_acknowledged_it() {
    let mut sim = Sim::quiet(3, node_config());
    // Site 2 writes k and pushes it, but never completes an anti-entropy session with anyone.
    sim.set(2, "k", "v").await;
    sim.push(2).await;
    sim.cut(0, 2);
    sim.cut(1, 2);
    assert_eq!(sim.get(0, "k").as_deref(), Some("v"));
    sim.delete(0, "k").await;
    for _ in 0..3 {
        sim.sync(0, 1).await.expect("sync");
        sim.sync(1, 0).await.expect("sync");
        sim.advance(MAX_AGE_MS + 1);
    }
    for i in 0..2 {
        assert_eq!(
            sim.sites[i].node.collect(sim.now()).expect("collect"),
            0,
            "site {i} collected without site 2's ack"
        );
    }
    // Site 2 comes back holding the old value: the tombstone must win everywhere.
    sim.heal().await.expect("heal");
    for i in 0..3 {
        assert_eq!(sim.get(i, "k"), None, "k resurrected at site {i}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_site_cut_off_past_the_horizon_resyncs_and_nothing_deleted_comes_back() {
    let config = NodeConfig { horizon_ms: 30_000, ..node_config() };
    let mut sim = Sim::quiet(3, config);
    sim.set(0, "k", "v").await;
    for j in 1..3 {
        sim.sync(0, j).await.expect("sync");
    }
    assert_eq!(sim.get(2, "k").as_deref(), Some("v"));
    sim.cut(0, 2);
    sim.cut(1, 2);
    // While site 2 is away: k is deleted and the tombstone collected once site 2 is past the horizon.
    sim.delete(1, "k").await;
    sim.set(2, "written-while-cut-off", "x").await;
    let mut collected = 0;
    for _ in 0..20 {
        sim.advance(3_000);
        sim.sync(0, 1).await.expect("sync");
        sim.sync(1, 0).await.expect("sync");
        collected += sim.sites[0].node.collect(sim.now()).expect("collect");
        collected += sim.sites[1].node.collect(sim.now()).expect("collect");
    }
    assert!(collected >= 2, "both sites collected the tombstone after cutting site 2 off");
    assert!(sim.sites[0].node.peers().iter().any(|p| p.url == url(2) && p.cut_off));
    // Site 2 returns: it is told to resync, drops what is older than the watermark, and pulls.
    sim.net.cut.lock().unwrap().clear();
    let refused = sim.sync(2, 0).await.expect_err("site 0 refuses a cut-off site's entries");
    assert!(refused.to_string().contains("requires a resync"), "{refused:#}");
    sim.set(2, "written-after-return", "y").await;
    sim.heal().await.expect("heal");
    for i in 0..3 {
        assert_eq!(sim.get(i, "k"), None, "k resurrected at site {i}");
        assert_eq!(sim.get(i, "written-after-return").as_deref(), Some("y"));
        // The documented price of the horizon: site 2's writes older than the watermark are gone.
        assert_eq!(sim.get(i, "written-while-cut-off"), None);
    }
    assert!(sim.sites[0].node.peers().iter().all(|p| !p.cut_off), "site 2 is accepted again");
}

/// A site that merged this site's data within the horizon cannot have cut it off, so its demand
/// to resync (a stale view, or forged in its name) is refused and nothing is dropped (the old code
/// discarded everything written before the watermark). The bound is the shorter of both
/// horizons: a peer whose horizon has passed since is obeyed.
#[tokio::test(flavor = "current_thread")]
async fn a_resync_demanded_by_a_peer_that_merged_this_sites_data_within_the_horizon_is_refused() {
    let config = NodeConfig { horizon_ms: 7 * 24 * 3600 * 1000, ..node_config() };
    let mut sim = Sim::quiet(3, config.clone());
    sim.set(0, "k", "v").await;
    sim.sync(0, 1).await.expect("sync");
    sim.advance(5_000);
    sim.set(0, "only-here", "w").await;
    let watermark = atoll_sync::message::hlc_wire(atoll_sync::SyncStore::now(&sim.sites[0].store));
    let site = sim.sites[1].node.me().site.clone();
    let incarnation = atoll_sync::SyncStore::identity(&sim.sites[1].store).incarnation;
    let demand = move |watermark, horizon_ms| Reply::ResyncRequired {
        watermark,
        uncounted: true,
        site: site.clone(),
        incarnation,
        horizon_ms,
    };
    *sim.net.forged.lock().unwrap() = Some((1, demand(watermark, config.horizon_ms)));
    let refused = sim.sync(0, 1).await.expect_err("the forged answer fails the session");
    assert!(refused.to_string().contains("within the horizon: refused"), "{refused:#}");
    assert_eq!(sim.get(0, "k").as_deref(), Some("v"));
    assert_eq!(sim.get(0, "only-here").as_deref(), Some("w"));
    assert_eq!(
        atoll_sync::SyncStore::resync_began(&sim.sites[0].store).expect("read"),
        None,
        "site 0 is not resyncing"
    );
    assert!(
        sim.sites[0].node.peers().iter().any(|p| p.url == url(1) && p.flag.is_some()),
        "site 1 is flagged"
    );
    // Once the hostile answers stop, everything converges.
    *sim.net.forged.lock().unwrap() = None;
    sim.heal().await.expect("heal");
    for i in 0..3 {
        assert_eq!(sim.get(i, "only-here").as_deref(), Some("w"));
    }
    // The same site with a horizon shorter than the time since it merged this data: obeyed.
    sim.net.lossy.store(false, Ordering::Relaxed);
    sim.sync(0, 1).await.expect("sync");
    sim.advance(200_000);
    let watermark = atoll_sync::message::hlc_wire(atoll_sync::SyncStore::now(&sim.sites[0].store));
    *sim.net.forged.lock().unwrap() = Some((1, demand(watermark, 130_000)));
    let obeyed = sim.sync(0, 1).await.expect_err("a resync fails the session");
    assert!(obeyed.to_string().contains("requires a resync: dropped"), "{obeyed:#}");
    *sim.net.forged.lock().unwrap() = None;
    sim.heal().await.expect("heal");
    assert_eq!(sim.get(0, "k").as_deref(), Some("v"), "pulled back from the others");
}

/// A counter keeps per-site totals, so increments made at a cut-off site after the delete cannot
/// be told from those before it: the resync drops the counter, or the deleted counter (with every
/// increment before the delete) would come back once the tombstone is collected.
#[tokio::test(flavor = "current_thread")]
async fn a_counter_deleted_while_a_site_was_cut_off_stays_deleted() {
    let config = NodeConfig { horizon_ms: 30_000, ..node_config() };
    let mut sim = Sim::quiet(3, config);
    sim.increment(0, "n", 5).await;
    sim.increment(2, "n", 7).await;
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        sim.sync(i, j).await.expect("sync");
    }
    assert_eq!(sim.get(1, "n").as_deref(), Some("12"));
    sim.delete(1, "n").await;
    assert!(sim.collect_without(2).await >= 2, "the tombstone was collected with site 2 cut off");
    // Site 2 never saw the delete and counts on; site 0 starts counting afresh.
    sim.increment(2, "n", 1).await;
    sim.increment(0, "n", 1).await;
    sim.net.cut.lock().unwrap().clear();
    sim.heal().await.expect("heal");
    for i in 0..3 {
        assert_eq!(sim.get(i, "n").as_deref(), Some("1"), "the deleted counter came back at site {i}");
    }
}

/// A member record that cannot be read (damaged, or written by another build) stops the site
/// with an error naming it: a site that forgot a member could collect without it, or take an
/// older copy of it for a new site.
#[tokio::test(flavor = "current_thread")]
async fn a_member_record_that_cannot_be_read_stops_the_site_with_its_name() {
    let sim = Sim::quiet(3, node_config());
    sim.sync(0, 2).await.expect("sync");
    sim.sites[0].store.set_meta("member/s2", &[9, 1, 2]).expect("write");
    let me = PeerInfo { site: "s0".into(), region: "sim".into(), url: url(0) };
    let refused = Node::new(sim.sites[0].store.clone(), me, node_config(), &[], sim.now())
        .expect_err("a site that cannot read a member record does not start");
    let text = format!("{refused:#}");
    assert!(text.contains("member/s2") && text.contains("version 9"), "{text}");
}

/// A restored copy that reincarnated is quarantined: nothing it sends is merged (by push or by
/// anti-entropy) until a session with a site it knew before its resync began ends it. A site met
/// since (here one that joined after the tombstone was collected everywhere) never held the
/// tombstone, so it must neither take the copy's deleted value nor vouch for the copy.
#[tokio::test(flavor = "current_thread")]
async fn a_restored_copy_is_quarantined_until_a_site_known_before_vouches() {
    let mut sim = Sim::quiet(3, node_config());
    sim.set(2, "k", "v").await;
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        sim.sync(i, j).await.expect("sync");
    }
    sim.snapshot(2);
    sim.delete(0, "k").await;
    let collected = sim.rounds(&[(0, 1), (0, 2), (1, 2), (1, 0), (2, 0), (2, 1)]).await;
    assert!(collected.iter().all(|&c| c == 1), "k's tombstone collected everywhere: {collected:?}");
    let newcomer = sim.add_site();
    sim.restore(2);
    assert_eq!(sim.get(2, "k").as_deref(), Some("v"), "the copy holds the deleted value");
    // Site 0 has seen a newer state of site 2: it must take a new incarnation (and resync).
    assert!(sim.sync(2, 0).await.is_err());
    assert!(sim.sites[2].store.resync_began().expect("read").is_some(), "site 2 resyncs");
    sim.cut(2, 0);
    sim.cut(2, 1);
    // While it resyncs, it meets only the newcomer: a host write pushed, sessions both ways.
    sim.set(2, "during-resync", "x").await;
    sim.push(2).await;
    assert_eq!(sim.get(newcomer, "during-resync"), None, "a resyncing site's push was merged");
    for _ in 0..2 {
        let _ = sim.sync(2, newcomer).await;
        let _ = sim.sync(newcomer, 2).await;
        assert_eq!(sim.get(newcomer, "k"), None, "the newcomer took the copy's deleted value");
        assert!(
            sim.sites[2].store.resync_began().expect("read").is_some(),
            "a site met after the resync began vouched for it"
        );
    }
    // Back in touch with the sites it knew: the resync ends, and nothing deleted comes back.
    sim.net.cut.lock().unwrap().clear();
    sim.heal().await.expect("heal");
    assert_eq!(sim.sites[2].store.resync_began().expect("read"), None);
    for i in 0..sim.n {
        assert_eq!(sim.get(i, "k"), None, "k came back at site {i}");
        assert_eq!(sim.get(i, "during-resync").as_deref(), Some("x"), "site {i}");
    }
}

/// A transport that, at the first anti-entropy round it carries, first has `node` say hello to
/// `hook` (which tells it to take a new incarnation): a resync begins during a session.
struct Interrupting {
    inner: Link,
    node: Arc<Node<Store>>,
    hook: String,
    now_ms: u64,
    fired: std::sync::atomic::AtomicBool,
}

impl Transport for Interrupting {
    async fn call(&self, url: &str, to: &str, request: Request) -> Result<Exchange> {
        if matches!(request, Request::Reconcile(..)) && !self.fired.swap(true, Ordering::Relaxed) {
            let told = self.node.say_hello(&self.inner, &self.hook, self.now_ms).await;
            assert!(told.is_err_and(|e| e.to_string().contains("new incarnation")));
        }
        self.inner.call(url, to, request).await
    }
}

/// A resync that begins while a session is under way is not ended by that session, whoever the
/// peer is: the session read the store before the resync began.
#[tokio::test(flavor = "current_thread")]
async fn a_session_under_way_when_a_resync_begins_does_not_end_it() {
    let mut sim = Sim::quiet(3, node_config());
    let newcomer = sim.add_site();
    for j in [0, 1, newcomer] {
        sim.sync(2, j).await.expect("sync");
    }
    sim.snapshot(2);
    sim.set(2, "after-the-copy", "x").await;
    sim.sync(2, 0).await.expect("sync");
    sim.restore(2);
    // The copy (as empty as the newcomer) meets the newcomer, which takes it as it is.
    sim.sites[2].node.say_hello(&sim.link(2), &url(newcomer), sim.now()).await.expect("hello");
    assert_eq!(sim.sites[2].store.resync_began().expect("read"), None);
    let interrupting = Interrupting {
        inner: sim.link(2),
        node: sim.sites[2].node.clone(),
        hook: url(0),
        now_ms: sim.now(),
        fired: false.into(),
    };
    let rounds = sim.sites[2].node.anti_entropy(&interrupting, &url(newcomer), 7, sim.now()).await;
    assert_eq!(rounds.expect("the session ran to its end"), 1);
    assert!(
        sim.sites[2].store.resync_began().expect("read").is_some(),
        "a session under way when the resync began ended it"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn one_difference_among_many_keys_takes_three_round_trips_and_little_data() {
    let config = NodeConfig::default();
    let sim = Sim::quiet(3, config);
    let ns = sim.ns();
    let shared: Vec<(Vec<u8>, atoll_kv::Entry)> = (0..12_000)
        .map(|i| {
            let stamp =
                atoll_kv::Stamp { hlc: atoll_kv::Hlc { physical_ms: 10 + i, logical: 0 }, site: "x".into() };
            (ns.key(format!("k{i}").as_bytes()), atoll_kv::Entry::set(b"v".to_vec(), stamp))
        })
        .collect();
    for site in &sim.sites[..2] {
        site.store.merge(shared.clone()).await.expect("fill");
    }
    assert_eq!(sim.sync(0, 1).await.expect("sync"), 1, "identical stores: one round trip");
    let mut sim = sim;
    sim.set(0, "only-at-0", "x").await;
    let payload = |sim: &Sim| {
        sim.sites[0].node.peers().iter().map(|p| p.payload_sent + p.payload_received).sum::<u64>()
    };
    let before = payload(&sim);
    assert_eq!(sim.sync(0, 1).await.expect("sync"), 3, "one difference: three round trips");
    let cost = payload(&sim) - before;
    assert!(cost < 1024, "one difference among 12,000 cost {cost} bytes of messages");
    assert_eq!(sim.get(1, "only-at-0").as_deref(), Some("x"));
    // And the other way round: the responder holds the difference.
    sim.set(1, "only-at-1", "y").await;
    assert_eq!(sim.sync(0, 1).await.expect("sync"), 3);
    assert_eq!(sim.get(0, "only-at-1").as_deref(), Some("y"));
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_push_queue_falls_back_to_anti_entropy_and_nothing_is_lost() {
    let config = NodeConfig { push_queue: 3, ..node_config() };
    let mut sim = Sim::quiet(3, config);
    sim.cut(0, 1);
    sim.cut(0, 2);
    for i in 0..10 {
        sim.set(0, &format!("k{i}"), "v").await;
    }
    // Writes never waited; the queues kept what fit and flagged the rest.
    for peer in sim.sites[0].node.peers() {
        assert_eq!(peer.push_pending, 3, "{peer:?}");
        assert!(peer.needs_anti_entropy, "{peer:?}");
    }
    sim.net.cut.lock().unwrap().clear();
    sim.push(0).await;
    assert_eq!(sim.get(1, "k9"), None, "the push carried only what fit in the queue");
    for j in 1..3 {
        sim.sync(0, j).await.expect("anti-entropy");
    }
    for j in 1..3 {
        for i in 0..10 {
            assert_eq!(sim.get(j, &format!("k{i}")).as_deref(), Some("v"), "k{i} at site {j}");
        }
        assert!(!sim.sites[0].node.needs_anti_entropy(&url(j)));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_tombstone_that_arrives_late_is_kept_until_sessions_after_its_arrival() {
    // Z (2) deletes k at once; the tombstone reaches X (0) only after X's sessions with Y (1),
    // which still holds the value. Those sessions started after the tombstone's stamp, but not
    // after its arrival at X: they do not show that Y has it, so X must keep it.
    let mut sim = Sim::quiet(3, node_config());
    sim.set(1, "k", "v").await;
    sim.sync(1, 0).await.expect("sync");
    sim.sync(1, 2).await.expect("sync");
    sim.delete(2, "k").await;
    sim.cut(1, 2);
    sim.cut(0, 2);
    for _ in 0..3 {
        sim.advance(1);
        sim.sync(0, 1).await.expect("sync");
        sim.advance(MAX_AGE_MS + 1);
    }
    sim.cut(0, 1);
    sim.net.cut.lock().unwrap().remove(&(0, 2));
    for _ in 0..3 {
        sim.sync(0, 2).await.expect("sync");
        sim.advance(MAX_AGE_MS + 1);
    }
    assert_eq!(sim.get(0, "k"), None, "the tombstone reached X");
    assert_eq!(sim.get(1, "k").as_deref(), Some("v"), "Y still holds the value");
    sim.sites[0].node.collect(sim.now()).expect("collect");
    // X and Y meet again: the value must not come back at X.
    sim.net.cut.lock().unwrap().clear();
    sim.sync(0, 1).await.expect("sync");
    assert_eq!(sim.get(0, "k"), None, "k came back at X");
    assert_eq!(sim.get(1, "k"), None, "the tombstone reached Y");
}

#[tokio::test(flavor = "current_thread")]
async fn a_peer_known_by_another_url_than_it_advertises_stays_one_peer() {
    let mut sim = Sim::quiet(3, node_config());
    sim.cut(0, 2);
    // Site 0 knows site 1 only as "sim://alias-1" (say, a DNS name); site 1 advertises "sim://site-1".
    let me = PeerInfo { site: "s0".into(), region: "sim".into(), url: url(0) };
    let node = Arc::new(
        Node::new(sim.sites[0].store.clone(), me, node_config(), &["sim://alias-1".into()], sim.now())
            .expect("node"),
    );
    sim.sites[0].node = node.clone();
    sim.net.sites.lock().unwrap()[0] = Some(node.clone());
    let peers = |sim: &Sim| -> Vec<(String, Option<String>)> {
        sim.sites[0].node.peers().into_iter().map(|p| (p.url, p.site)).collect()
    };
    let alias = vec![("sim://alias-1".to_owned(), Some("s1".to_owned()))];
    for round in 0..3 {
        // Site 1 calls in (advertising its own URL), then site 0 calls it by the alias.
        sim.sites[1].node.say_hello(&sim.link(1), &url(0), sim.now()).await.expect("hello in");
        if round > 0 {
            assert_eq!(peers(&sim), alias, "a hello from a known site does not add its advertised URL");
        }
        node.say_hello(&sim.link(0), "sim://alias-1", sim.now()).await.expect("hello out");
        assert_eq!(peers(&sim), alias, "the URL that answered replaces the advertised one");
    }
    sim.set(0, "k", "v").await;
    sim.push(0).await;
    assert_eq!(sim.get(1, "k").as_deref(), Some("v"));
}

/// 40 values of 1 MiB in one range of the key-hash space: rounds and pushes keep to their byte
/// budgets as they are built, so the range converges over several rounds instead of one message
/// over the size limit that every peer refuses.
#[tokio::test(flavor = "current_thread")]
async fn a_range_of_forty_values_of_one_mebibyte_converges() {
    let config = NodeConfig { max_message_age_ms: MAX_AGE_MS, ..NodeConfig::default() };
    let mut sim = Sim::quiet(3, config);
    let ns = sim.ns();
    let range = atoll_kv::range_of(&ns.key(b"big-0"));
    let keys: Vec<String> = (0..)
        .map(|i| format!("big-{i}"))
        .filter(|k| atoll_kv::range_of(&ns.key(k.as_bytes())) == range)
        .take(40)
        .collect();
    let value = "x".repeat((1 << 20) - 64);
    // Site 0 writes them while cut off from 1; site 2 gets them by push.
    sim.cut(0, 1);
    for key in &keys {
        sim.set(0, key, &value).await;
    }
    sim.push(0).await;
    sim.push(0).await;
    sim.push(0).await;
    sim.push(0).await;
    sim.push(0).await;
    sim.push(0).await;
    for key in &keys {
        assert_eq!(sim.get(2, key).map(|v| v.len()), Some(value.len()), "{key} pushed to site 2");
    }
    // Site 1 has none of them: anti-entropy from site 2 carries them in rounds within budget.
    let rounds = sim.sync(2, 1).await.expect("anti-entropy within the size limit");
    assert!(rounds > 5, "{rounds} rounds: 40 MiB cannot go in one 8 MiB round");
    for key in &keys {
        assert_eq!(sim.get(1, key).map(|v| v.len()), Some(value.len()), "{key} at site 1");
    }
}

/// A store's seen vector must cover a counter contribution that arrives on a new register even
/// when its value equals the one it had on the old register (session tokens are built from it:
/// a client that read the counter here must be held to that increment elsewhere).
#[tokio::test(flavor = "current_thread")]
async fn a_contribution_moved_to_a_new_register_counts_in_the_seen_vector() {
    let mut sim = Sim::quiet(3, node_config());
    let (a, b, x) = (0, 1, 2);
    sim.set(a, "k", "0").await;
    sim.push(a).await;
    sim.increment(b, "k", 1).await;
    sim.note_contribution(b, "k");
    sim.push(b).await;
    // A sets k again (a new register, the counter restarts); B merges it and increments by the
    // same 1 on top; X gets B's entry (A's push to X is cut off).
    sim.cut(a, x);
    sim.set(a, "k", "0").await;
    sim.push(a).await;
    sim.increment(b, "k", 1).await;
    sim.note_contribution(b, "k");
    sim.push(b).await;
    assert_eq!(sim.get(x, "k").as_deref(), Some("1"), "X holds the new register with B's increment");
    sim.seen_covers_what_is_held().expect("X's seen vector covers B's new increment");
}

/// A hello its site sent just before it crashed, delivered after the site restarted and said
/// hello again (a slow link, a peer that answers it late), is stale: it says nothing of the site
/// now. Taken for a hello from an older copy of the data dir, it made the site reincarnate and
/// resync, which dropped the increments on a counter no peer held yet (seed 2252 of the long run).
#[tokio::test(flavor = "current_thread")]
async fn a_hello_delayed_past_its_senders_restart_changes_nothing() {
    let mut sim = Sim::quiet(3, node_config());
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        sim.sync(i, j).await.expect("sync");
    }
    // Site 1 increments a counter only it holds, and says hello to site 0; that hello is held up.
    sim.increment(1, "c", 5).await;
    let stale = sim.sites[1].node.hello(sim.wall(1)).await.expect("hello");
    let incarnation = sim.sites[1].store.identity().incarnation;
    sim.restart(1);
    sim.sites[1].node.say_hello(&sim.link(1), &url(0), sim.wall(1)).await.expect("hello after the restart");
    // The held-up hello arrives now, within the signature window.
    sim.advance(100);
    let _ = sim.sites[0].node.handle(Request::Hello(stale.clone()), sim.wall(0)).await;
    for (i, j) in [(1, 0), (1, 2), (0, 2)] {
        sim.sync(i, j).await.expect("the restarted site is accepted as it is");
    }
    assert_eq!(sim.sites[1].store.identity().incarnation, incarnation, "site 1 was made to reincarnate");
    for i in 0..3 {
        assert_eq!(sim.get(i, "c").as_deref(), Some("5"), "site {i} lost the increment");
    }
    // A hello of that earlier boot sent after the restart opened (the boot kept running on a
    // copy of the data dir, and wrote since) is an older copy all the same.
    let mut later = stale;
    later.durable = (sim.sites[1].store.identity().opened_at.physical_ms + 1, 0);
    later.wall_ms = sim.wall(1);
    let reply = sim.sites[0].node.handle(Request::Hello(later), sim.wall(0)).await.expect("answer");
    assert!(matches!(reply, Reply::Reincarnate), "{reply:?}");
}
