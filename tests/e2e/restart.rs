//! A restarted site serves what it had: the registry is durable across SIGKILL.

use super::*;

#[test]
fn a_killed_and_restarted_site_serves_its_apps() {
    let site = Site::start("restart");
    let hello_out = site.deploy("hello", atoll_test_guests::HELLO, &[]);
    site.deploy("probe", atoll_test_guests::PROBE, &["--deadline-ms", "1500"]);
    let before = json(&site.admin("GET", "/_atoll/apps", None).body);

    let site = site.kill_and_restart();
    let after = json(&site.admin("GET", "/_atoll/apps", None).body);
    assert_eq!(before, after, "same apps, versions, sizes, times and settings");
    assert_eq!(after[1]["settings"]["deadline_ms"], 1500);
    let hello = site.get("/apps/hello/");
    assert_eq!(hello.status, 200, "{hello:?}");
    assert!(hello_out.contains(after[0]["version"].as_str().expect("version")));
    assert_eq!(site.get("/apps/probe/static").body, "1\n");
}
