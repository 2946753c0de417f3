//! The status page in a real headless browser (Debian's `chromium`; `.ci/run` installs it):
//! load it against real processes, check what it shows, kill a site, see it turn dead, and save
//! a screenshot (`target/tmp/ui-status-*.png`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{RouterProc, Site, eventually};

const WAIT: Duration = Duration::from_secs(60);

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// Loads `url` in headless chromium, lets its scripts run, and returns the resulting DOM; with
/// `screenshot`, also saves a PNG there.
fn browse(browser: &PathBuf, url: &str, screenshot: Option<&PathBuf>) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = Command::new(browser);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=4000"])
        .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => cmd.arg("--window-size=1100,1500").arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_shows_sites_routes_replication_and_apps_and_a_killed_site_turns_dead() {
    let Some(browser) = chromium() else {
        assert!(std::env::var_os("CI").is_none(), "CI must install chromium (see .ci/run)");
        eprintln!("SKIPPED: no chromium on PATH (Debian: apt-get install chromium); CI runs this test");
        return;
    };
    let a = Site::start_with("us-east-1", &["--region", "us-east"], Some("[sync]\nanti_entropy_ms = 300\n"));
    let mut b = Site::start_with("eu-west-1", &["--region", "eu-west", "--peer", &a.url], None);
    a.deploy("hello", atoll_test_guests::HELLO, &[]);
    a.deploy("counter", atoll_test_guests::COUNTER, &[]);
    eventually(WAIT, "hello at eu-west-1", || {
        (b.admin("GET", "/_atoll/apps/hello", None).status == 200).then_some(())
    });
    let router = RouterProc::start(&[&a.url, &b.url], None);
    eventually(WAIT, "the router sees both", || {
        let sites = router.status()["sites"].as_array()?.clone();
        (sites.len() == 2 && sites.iter().all(|s| s["live"] == true && s["name"].is_string())).then_some(())
    });

    // A site's page: itself and its peer live, the routing table, the peer's replication, the app.
    let dom = eventually(WAIT, "a's page lists its peer and the app", || {
        let dom = browse(&browser, &format!("{}/_atoll/ui", a.url), None);
        (dom.contains(r#"data-site="eu-west-1""#) && dom.contains("hello")).then_some(dom)
    });
    assert!(dom.contains("Atoll site us-east-1"), "{dom}");
    assert!(dom.contains(r#"<tr class="live" data-site="us-east-1">"#), "{dom}");
    assert!(dom.contains(r#"<tr class="live" data-site="eu-west-1">"#), "{dom}");
    assert!(dom.contains("<td>eu-central</td><td>eu-west-1</td>"), "routing table: {dom}");
    assert!(dom.contains("eu-west-1 (live)"), "the map: {dom}");

    // The router's page, then kill a site: it turns dead there.
    let page = format!("{}/_atoll/ui", router.url);
    let dom = browse(&browser, &page, None);
    assert!(dom.contains(r#"<tr class="live" data-site="eu-west-1">"#), "{dom}");
    // Replication and apps as the nearest live site reports them.
    assert!(dom.contains("(as us-east-1 reports it)") && dom.contains("<td>hello</td>"), "{dom}");
    assert!(dom.contains("<td>eu-west-1</td>"), "a's peer in the replication table: {dom}");
    b.kill();
    let dom = eventually(WAIT, "eu-west-1 dead on the router's page", || {
        let dom = browse(&browser, &page, None);
        dom.contains(r#"<tr class="dead" data-site="eu-west-1">"#).then_some(dom)
    });
    assert!(dom.contains("eu-west-1 (dead)"), "the map: {dom}");
    assert!(dom.contains("<td>eu-west</td><td>us-east-1</td>"), "eu-west fails over in the table: {dom}");
    assert!(dom.contains(r#"<tr class="live" data-site="us-east-1">"#), "{dom}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-status-router.png");
    screenshot(&browser, &page, &shot);

    // What happened, not only what is: a write at us-east-1 while eu-west-1 is down, then
    // eu-west-1 restarts. us-east-1's timeline has the down and the up and the failover and
    // back; eu-west-1's lag from us-east-1 spikes as it catches up (the write is that old).
    let written = std::time::Instant::now();
    assert_eq!(
        crate::request("POST", &format!("{}/apps/counter/while-away", a.url), &[], Some(b"")).status,
        200
    );
    eventually(WAIT, "us-east-1's history has eu-west-1 down, and time passes", || {
        let history = crate::json(&a.get("/_atoll/ui/state").body)["history"].clone();
        let down = history["events"].as_array()?.iter().any(|e| e["text"] == "eu-west-1 down");
        (down && written.elapsed() > Duration::from_millis(1500)).then_some(())
    });
    let b = b.kill_and_restart();
    let site_page = format!("{}/_atoll/ui", a.url);
    let dom = eventually(WAIT, "us-east-1's page shows eu-west-1 down and up on its timeline", || {
        let dom = browse(&browser, &site_page, None);
        (dom.contains(r#"data-kind="down""#) && dom.contains(r#"data-kind="up""#)).then_some(dom)
    });
    for text in [
        "eu-west-1 down",
        "eu-west-1 up",
        "failed over to us-east-1",
        "served by eu-west-1 again",
        "us-east-1 started",
        "counter deployed",
    ] {
        assert!(dom.contains(text), "{text:?} on the timeline: {dom}");
    }
    for metric in [
        "requests",
        "errors",
        "latency",
        "instantiations",
        "kv ops",
        "routing",
        "lag to eu-west-1",
        "replication eu-west-1",
    ] {
        assert!(dom.contains(&format!(r#"data-metric="{metric}""#)), "a {metric} chart: {dom}");
    }
    assert!(dom.contains(r#"class="land""#), "the coastline on the map: {dom}");
    let spike = eventually(WAIT, "eu-west-1's lag from us-east-1 spikes as it catches up", || {
        let history = crate::json(&b.get("/_atoll/ui/state").body)["history"].clone();
        history["samples"]
            .as_array()?
            .iter()
            .filter_map(|s| s["peers"]["us-east-1"]["lag_ms"].as_u64())
            .find(|l| *l >= 1000)
    });
    eprintln!("eu-west-1's lag from us-east-1 after its restart: {spike} ms");
    let dom = browse(&browser, &format!("{}/_atoll/ui", b.url), None);
    assert!(dom.contains(r#"data-metric="lag to us-east-1""#), "{dom}");
    screenshot(&browser, &site_page, &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-status-site.png"));
}

fn screenshot(browser: &PathBuf, page: &str, shot: &PathBuf) {
    browse(browser, page, Some(shot));
    let png = std::fs::read(shot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot at {}", shot.display());
    eprintln!("screenshot: {}", shot.display());
}
