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
        sample(&text, "atoll_sync_peer_last_sync_age_seconds", &["peer=\"b\""])?;
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
    // Per peer: nothing queued once replication caught up (and the last sync's age, waited for above).
    assert_eq!(sample(&text, "atoll_sync_push_pending", &["peer=\"b\""]), Some(0.0), "{text}");
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

#[test]
fn json_logs_carry_one_request_id_across_router_site_and_forwarded_site_into_guest_lines() {
    let json = ["--log-format", "json"];
    let a = Site::start_with("a", &[&json[..], &["--region", "us-east"]].concat(), None);
    let b = Site::start_with("b", &[&json[..], &["--region", "eu-west", "--peer", &a.url]].concat(), None);
    a.deploy("probe", atoll_test_guests::PROBE, &[]);
    eventually(WAIT, "probe at b", || {
        (b.admin("GET", "/_atoll/apps/probe", None).status == 200).then_some(())
    });
    let guest_line = |id: &str| {
        b.stderr().lines().find(|l| l.contains(id) && l.contains("probe says")).map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            v
        })
    };
    // Entering at a, an eu-west request is forwarded to b with the client's id.
    let url = format!("{}/apps/probe/log?hello", a.url);
    eventually(WAIT, "a forwards eu-west to b", || {
        let r = request("GET", &url, &[("x-atoll-region", "eu-west"), ("x-request-id", "trace-123")], None);
        (r.headers.get("x-atoll-site").is_some_and(|v| v == "b")).then_some(())
    });
    let line = eventually(WAIT, "b's guest line with the id", || guest_line("trace-123"));
    assert_eq!(line["fields"]["request_id"], "trace-123", "{line}");
    // Through a router without an id: the router makes one, and it reaches the guest at b.
    let router = RouterProc::start(&[&a.url, &b.url], None);
    let r = eventually(WAIT, "the router routes eu-west to b", || {
        let r = router.get("/apps/probe/log?again", Some("eu-west"));
        (r.headers.get("x-atoll-site").is_some_and(|v| v == "b")).then_some(r)
    });
    let id = r.headers.get("x-request-id").and_then(|v| v.to_str().ok()).expect("an id").to_owned();
    let line = eventually(WAIT, "b's guest line with the router's id", || guest_line(&id));
    assert_eq!(line["fields"]["request_id"], id.as_str());
}

#[test]
fn readiness_waits_for_a_first_sync_with_a_peer_or_the_timeout() {
    // A peer that never answers: not ready until the timeout.
    let lonely = Site::start_with(
        "lonely",
        &["--peer", "http://127.0.0.1:9", "--set", "sync.ready_timeout_s=2"],
        None,
    );
    let r = lonely.get("/_atoll/health?ready");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(crate::json(&r.body)["ready"], false);
    assert_eq!(lonely.get("/_atoll/health").status, 200, "alive all the same (liveness)");
    eventually(WAIT, "ready after the timeout", || {
        (lonely.get("/_atoll/health?ready").status == 200).then_some(())
    });
    // A reachable peer: ready once the first session with it completed.
    let a = Site::start("a");
    assert_eq!(a.get("/_atoll/health?ready").status, 200, "no peers: ready at once");
    let b = Site::start_with("b", &["--peer", &a.url], None);
    eventually(WAIT, "b ready after syncing with a", || {
        (b.get("/_atoll/health?ready").status == 200).then_some(())
    });
}
