//! Graceful shutdown: SIGTERM lets requests in flight finish, pushes queued writes to the peers,
//! and exits 0.

use std::time::Duration;

use crate::{Site, eventually, request};

const WAIT: Duration = Duration::from_secs(30);

fn sigterm(site: &Site) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(site.child.id() as libc::pid_t, libc::SIGTERM) };
}

fn metric(site: &Site, name: &str) -> f64 {
    let text = site.get("/metrics").body;
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn sigterm_lets_requests_in_flight_finish_and_exits_0() {
    let mut site = Site::start("a");
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let url = format!("{}/apps/probe/sleep?ms=1500", site.url);
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || request("GET", &url, &[], None))
        })
        .collect();
    eventually(WAIT, "three requests in flight", || {
        (metric(&site, "atoll_requests_in_flight") >= 3.0).then_some(())
    });
    sigterm(&site);
    for r in requests {
        let r = r.join().expect("request thread");
        assert_eq!(r.status, 200, "a request in flight at SIGTERM was served: {}", r.body);
    }
    let status = eventually(WAIT, "the site exits", || site.child.try_wait().expect("wait"));
    assert!(status.success(), "exit status {status}; stderr:\n{}", site.stderr());
    assert!(site.stderr().contains("stopped"), "{}", site.stderr());
}

#[test]
fn sigterm_pushes_queued_writes_to_the_peers_before_exiting() {
    // a batches pushes for 10 s and reconciles rarely: only the flush at shutdown can get a
    // write made just before SIGTERM to b while a is gone.
    let slow = "[sync]\npush_delay_ms = 10000\nanti_entropy_ms = 600000\n";
    let mut a = Site::start_with("a", &[], Some(slow));
    let b = Site::start_with("b", &["--peer", &a.url], Some("[sync]\nanti_entropy_ms = 600000\n"));
    a.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    eventually(WAIT, "kv at b", || (b.admin("GET", "/_atoll/apps/kv", None).status == 200).then_some(()));
    let r = request("PUT", &format!("{}/apps/kv/b/last-word", a.url), &[], Some(b"flushed"));
    assert_eq!(r.status, 200, "{}", r.body);
    sigterm(&a);
    let status = eventually(WAIT, "a exits", || a.child.try_wait().expect("wait"));
    assert!(status.success(), "exit status {status}; stderr:\n{}", a.stderr());
    assert!(a.stderr().contains("replication flushed"), "{}", a.stderr());
    let r = b.get("/apps/kv/b/last-word");
    assert_eq!((r.status, r.body.as_str()), (200, "flushed"), "b has the write a made just before stopping");
}
