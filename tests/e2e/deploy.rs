//! The user's path: deploy with the CLI, call by path and by Host, list, delete; admin auth.

use super::*;

#[test]
fn deploy_then_call_by_path_and_by_host() {
    let site = Site::start("e2e-site");
    let out = site.deploy("hello", atoll_test_guests::HELLO, &[]);
    let version =
        out.split("version ").nth(1).and_then(|s| s.split_whitespace().next()).expect("version printed");
    assert_eq!(version.len(), 64, "{out}");
    assert!(out.contains(&format!("curl {}/apps/hello/", site.url)), "{out}");
    assert!(out.contains("Host: hello.localhost"), "{out}");

    let by_path = site.get("/apps/hello/some/where?x=1");
    assert_eq!(by_path.status, 200, "{by_path:?}");
    assert!(by_path.body.contains("site e2e-site in region us-east"), "{}", by_path.body);
    assert!(by_path.body.contains("You asked for /some/where"), "prefix stripped: {}", by_path.body);
    assert_eq!(by_path.headers["x-atoll-site"], "e2e-site");

    let by_host = site.get_with_host("hello.example.com", "/apps/elsewhere");
    assert_eq!(by_host.status, 200, "{by_host:?}");
    assert!(by_host.body.contains("You asked for /apps/elsewhere"), "host wins, path kept: {}", by_host.body);

    let listed = atoll(&["apps", "--site", &site.url]);
    assert!(listed.status.success());
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("hello") && listed.contains(version), "{listed}");

    let info = json(&site.admin("GET", "/_atoll/apps/hello", None).body);
    assert_eq!(info["version"], version);
    assert_eq!(info["size"], read(atoll_test_guests::HELLO).len());
}

#[test]
fn guest_logs_reach_the_site_log_tagged_with_app_and_request_id() {
    let site = Site::start("logs");
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let url = format!("{}/apps/probe/log?abc", site.url);
    let response = request("GET", &url, &[("x-request-id", "req-42")], None);
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["x-request-id"], "req-42");
    for expected in ["probe says abc", "probe warns abc"] {
        let line = eventually(Duration::from_secs(10), expected, || {
            site.stderr().lines().find(|l| l.contains(expected)).map(str::to_owned)
        });
        assert!(line.contains("req-42") && line.contains("probe"), "{line}");
    }
}

#[test]
fn unknown_app_is_404() {
    let site = Site::start("unknown");
    let by_path = site.get("/apps/nope/");
    assert_eq!(by_path.status, 404);
    assert!(by_path.body.contains("\"nope\""), "{}", by_path.body);
    let by_host = site.get_with_host("nope.localhost", "/");
    assert_eq!(by_host.status, 404);
    assert!(by_host.body.contains("\"nope\""), "{}", by_host.body);
    assert_eq!(site.get("/").status, 404);
    assert_eq!(site.admin("GET", "/_atoll/apps/nope", None).status, 404);
}

#[test]
fn admin_api_needs_the_token_and_health_does_not() {
    let site = Site::start("auth");
    let health = site.get("/_atoll/health");
    assert_eq!(health.status, 200);
    assert_eq!(json(&health.body)["site"], "auth");

    let none = site.get("/_atoll/apps");
    assert_eq!(none.status, 401);
    assert!(json(&none.body)["error"].as_str().expect("reason").contains("missing admin token"));
    let wrong =
        request("GET", &format!("{}/_atoll/apps", site.url), &[("authorization", "Bearer nope")], None);
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("invalid admin token"), "{}", wrong.body);

    let upload = request(
        "PUT",
        &format!("{}/_atoll/apps/hello", site.url),
        &[("authorization", "Bearer nope"), ("expect", "100-continue")],
        Some(&read(atoll_test_guests::HELLO)),
    );
    assert_eq!(upload.status, 401);
    assert_eq!(site.get("/apps/hello/").status, 404, "nothing was deployed");

    let cli = Command::new(ATOLL)
        .args(["deploy", "--site", &site.url, "--app", "hello", "--token", "nope", atoll_test_guests::HELLO])
        .output()
        .expect("run");
    assert!(!cli.status.success());
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(stderr.contains("401") && stderr.contains("invalid admin token"), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn delete_removes_an_app() {
    let site = Site::start("delete");
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    assert_eq!(site.get("/apps/hello/").status, 200);
    let out = atoll(&["delete", "--site", &site.url, "--app", "hello"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(site.get("/apps/hello/").status, 404);
    let again = atoll(&["delete", "--site", &site.url, "--app", "hello"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("404"));
}

#[test]
fn site_without_token_refuses_to_start_unless_insecure_dev() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(ATOLL)
        .args(["site", "--name", "x", "--region", "us-east", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .env_remove("ATOLL_ADMIN_TOKEN")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ATOLL_ADMIN_TOKEN") && stderr.contains("--insecure-dev"), "{stderr}");

    let mut child = Command::new(ATOLL)
        .args([
            "site",
            "--name",
            "dev",
            "--region",
            "us-east",
            "--listen",
            "127.0.0.1:0",
            "--insecure-dev",
            "--data",
        ])
        .arg(dir.path())
        .env_remove("ATOLL_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let url = wait_for_listen_line(&mut child, &dir.path().join("none"));
    let listed = request("GET", &format!("{url}/_atoll/apps"), &[], None);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(listed.status, 200, "{listed:?}");
}
