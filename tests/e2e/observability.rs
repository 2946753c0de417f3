//! What an operator sees: `/metrics` on sites and routers.

use std::time::Duration;

use crate::{RouterProc, Site, eventually, request};

const WAIT: Duration = Duration::from_secs(30);

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_show_requests_guests_kv_replication_and_routing() {
    let a = Site::start_with("a", &["--region", "us-east"], Some("[sync]\nanti_entropy_ms = 300\n"));
    let b = Site::start_with("b", &["--region", "eu-west", "--peer", &a.url], None);
    a.deploy("counter", atoll_test_guests::COUNTER, &[]);
    a.deploy("probe", atoll_test_guests::PROBE, &["--deadline-ms", "300"]);
    for _ in 0..3 {
        assert_eq!(request("POST", &format!("{}/apps/counter/hits", a.url), &[], Some(b"")).status, 200);
    }
    assert_eq!(a.get("/apps/probe/trap").status, 500);
    assert_eq!(a.get("/apps/probe/loop").status, 504);
    let text = eventually(WAIT, "replication and routing in a's metrics", || {
        let text = a.get("/metrics").body;
        let replicated =
            sample(&text, "atoll_sync_entries_total", &["peer=\"b\"", "direction=\"sent\""])? > 0.0;
        let routed = sample(&text, "atoll_router_site_up", &["target=\"b\""])? == 1.0;
        (replicated && routed).then_some(text)
    });
    let site = "site=\"a\"";
    assert_eq!(
        sample(&text, "atoll_requests_total", &["app=\"counter\"", "status=\"200\"", site]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "atoll_guest_traps_total", &["app=\"probe\""]), Some(1.0));
    assert_eq!(sample(&text, "atoll_guest_timeouts_total", &["app=\"probe\""]), Some(1.0));
    assert_eq!(sample(&text, "atoll_kv_operations_total", &["op=\"increment\""]), Some(3.0));
    assert_eq!(sample(&text, "atoll_request_duration_seconds_count", &["app=\"counter\""]), Some(3.0));
    assert!(
        sample(&text, "atoll_instantiation_seconds_count", &["app=\"counter\""]).is_some_and(|n| n >= 3.0)
    );
    assert_eq!(sample(&text, "atoll_apps_deployed", &[]), Some(2.0));
    assert!(
        sample(&text, "atoll_sync_lag_seconds", &["peer=\"b\""]).is_some()
            || text.contains("atoll_sync_push_pending")
    );
    assert!(text.contains("# TYPE atoll_request_duration_seconds histogram"), "{text}");

    let router = RouterProc::start(&[&a.url, &b.url], None);
    eventually(WAIT, "router sees both", || {
        let text = request("GET", &format!("{}/metrics", router.url), &[], None).body;
        (sample(&text, "atoll_router_site_up", &["target=\"a\""]) == Some(1.0)
            && sample(&text, "atoll_router_site_up", &["target=\"b\""]) == Some(1.0))
        .then_some(())
    });
    assert_eq!(router.get("/apps/counter/hits", Some("eu-west")).status, 200);
    assert_eq!(router.get("/apps/counter/hits", Some("mars")).status, 200);
    let text = request("GET", &format!("{}/metrics", router.url), &[], None).body;
    assert!(
        sample(&text, "atoll_routing_decisions_total", &["reason=\"nearest\""]).is_some_and(|n| n >= 2.0),
        "{text}"
    );
    assert_eq!(sample(&text, "atoll_routing_default_region_total", &["why=\"unknown\""]), Some(1.0));
}
