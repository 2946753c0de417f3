//! Hostile guests fail only their own request; the site and other apps carry on.

use super::*;

#[test]
fn looping_guest_gets_504_while_a_concurrent_request_to_a_good_app_succeeds() {
    let site = Site::start("loop");
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    site.deploy("probe", atoll_test_guests::PROBE, &["--deadline-ms", "3000"]);
    let url = format!("{}/apps/probe/loop", site.url);
    let looping = std::thread::spawn(move || request("GET", &url, &[], None));
    eventually(Duration::from_secs(30), "the guest to start looping", || {
        site.stderr().contains("probe: looping").then_some(())
    });
    // The looping guest yields its thread at every epoch tick, so requests to other apps are
    // served meanwhile, even when they land on the same server thread.
    for _ in 0..3 {
        let hello = site.get("/apps/hello/");
        assert_eq!(hello.status, 200, "{hello:?}");
    }
    assert!(!looping.is_finished(), "the hello requests were served while the guest looped");
    let looped = looping.join().expect("join");
    assert_eq!(looped.status, 504, "{looped:?}");
    assert!(looped.body.contains("deadline of 3000 ms"), "{}", looped.body);
    assert_eq!(site.get("/apps/probe/static").body, "1\n", "the next request is served normally");
}

#[test]
fn memory_hungry_guest_gets_500_and_the_site_stays_up() {
    let site = Site::start("oom");
    site.deploy("probe", atoll_test_guests::PROBE, &["--memory-mb", "16"]);
    let oom = site.get("/apps/probe/oom");
    assert_eq!(oom.status, 500, "{oom:?}");
    assert!(oom.body.contains("handler failed"), "{}", oom.body);
    assert_eq!(site.get("/_atoll/health").status, 200);
    assert_eq!(site.get("/apps/probe/static").status, 200);
}

#[test]
fn trapping_guest_gets_500_and_the_next_request_is_served() {
    let site = Site::start("trap");
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let trap = site.get("/apps/probe/trap");
    assert_eq!(trap.status, 500);
    assert_eq!(trap.headers["x-atoll-site"], "trap");
    assert_eq!(site.get("/apps/probe/static").body, "1\n");
}

#[test]
fn outbound_http_follows_the_allow_list() {
    let site = Site::start("egress");
    let target = format!("{}/_atoll/health", site.url);
    let host = site.url.trim_start_matches("http://").to_owned();
    site.deploy("closed", atoll_test_guests::PROBE, &[]);
    site.deploy("open", atoll_test_guests::PROBE, &["--allow-host", &host]);
    let denied = site.get(&format!("/apps/closed/fetch?url={target}"));
    assert_eq!(denied.status, 502);
    assert!(denied.body.contains("HttpRequestDenied"), "{}", denied.body);
    let allowed = site.get(&format!("/apps/open/fetch?url={target}"));
    assert_eq!((allowed.status, allowed.body.as_str()), (200, "fetched: 200\n"));
}
