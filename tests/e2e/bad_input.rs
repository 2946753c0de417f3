//! Every bad input gets a clear error, and the version deployed before keeps serving.

use super::*;

/// Uploads `bytes` over `hello` and checks the status, the reason, and that hello still serves
/// the version it had.
fn refused(site: &Site, bytes: &[u8], status: u16, reason: &str) {
    let before = json(&site.admin("GET", "/_atoll/apps/hello", None).body)["version"].clone();
    let response = site.admin("PUT", "/_atoll/apps/hello", Some(bytes));
    assert_eq!(response.status, status, "{response:?}");
    let error = json(&response.body)["error"].as_str().expect("reason").to_owned();
    assert!(error.contains(reason), "expected {reason:?} in {error:?}");
    let after = site.get("/apps/hello/");
    assert_eq!(after.status, 200, "previous version still serves");
    assert!(after.body.starts_with("Hello from Atoll"), "{}", after.body);
    assert_eq!(json(&site.admin("GET", "/_atoll/apps/hello", None).body)["version"], before);
}

#[test]
fn bad_components_are_refused_and_the_previous_version_keeps_serving() {
    let site = Site::start("bad-input");
    site.deploy("hello", atoll_test_guests::HELLO, &[]);

    refused(&site, b"#!/bin/sh\necho not wasm\n", 400, "not a WebAssembly binary");
    refused(
        &site,
        &wat::parse_str("(module)").expect("wat"),
        400,
        "core WebAssembly module, not a component",
    );
    refused(
        &site,
        &wat::parse_str("(component)").expect("wat"),
        400,
        "exports neither wasi:http/incoming-handler",
    );
    let unknown_import = r#"(component (import "example:missing/thing" (instance (export "f" (func)))))"#;
    refused(&site, &wat::parse_str(unknown_import).expect("wat"), 400, "example:missing/thing");
    // A Spin app using an interface Atoll does not provide (spin:sqlite): refused by name.
    refused(&site, &read(atoll_test_guests::SPIN_SQLITE), 400, "spin:sqlite/sqlite@");
    let hello = read(atoll_test_guests::HELLO);
    refused(&site, &hello[..hello.len() / 2], 400, "invalid component");
    refused(&site, b"", 400, "empty upload");

    // The CLI prints the site's reason, not a trace.
    let dir = tempfile::tempdir().expect("tempdir");
    let bogus = dir.path().join("bogus.wasm");
    std::fs::write(&bogus, b"nope").expect("write");
    let out = atoll(&["deploy", "--site", &site.url, "--app", "hello", bogus.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: deploy failed") && stderr.contains("not a WebAssembly binary"),
        "{stderr}"
    );
}

#[test]
fn oversized_upload_is_413_and_the_previous_version_keeps_serving() {
    let hello_size = read(atoll_test_guests::HELLO).len();
    let probe = read(atoll_test_guests::PROBE);
    assert!(probe.len() > hello_size + 1000, "test needs probe larger than hello");
    let config = format!("[admin]\nmax_upload_bytes = {}\n", hello_size + 1000);
    let site = Site::start_with("oversized", &[], Some(&config));
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    refused(&site, &probe, 413, "limit");
}

#[test]
fn invalid_app_name_and_parameters_are_400() {
    let site = Site::start("names");
    let hello = read(atoll_test_guests::HELLO);
    let response = site.admin("PUT", "/_atoll/apps/Bad_Name", Some(&hello));
    assert_eq!(response.status, 400);
    assert!(response.body.contains("invalid app name"), "{}", response.body);
    let response = site.admin("PUT", "/_atoll/apps/ok?deadline_ms=0", Some(&hello));
    assert_eq!(response.status, 400);
    assert!(response.body.contains("deadline_ms"), "{}", response.body);
    let response = site.admin("PUT", "/_atoll/apps/ok?memory_mb=100000", Some(&hello));
    assert_eq!(response.status, 400);
    assert!(
        response.body.contains("memory_mb") && response.body.contains("instance pool"),
        "{}",
        response.body
    );
    assert_eq!(site.get("/apps/ok/").status, 404, "nothing deployed");
}

#[test]
fn oversized_request_body_to_an_app_is_413() {
    let site = Site::start_with("bodies", &[], Some("[limits]\nmax_request_body_bytes = 1000\n"));
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let ok = request("POST", &format!("{}/apps/probe/echo", site.url), &[], Some(&[b'a'; 1000]));
    assert_eq!((ok.status, ok.body.len()), (200, 1000));
    let big = request("POST", &format!("{}/apps/probe/echo", site.url), &[], Some(&[b'a'; 1001]));
    assert_eq!(big.status, 413);
    assert!(big.body.contains("1000 bytes"), "{}", big.body);
}

#[test]
fn invalid_config_is_an_error_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[limits]\ndeadline_seconds = 3\n").expect("write");
    let out = Command::new(ATOLL)
        .args(["site", "--name", "x", "--region", "r", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .env("ATOLL_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("deadline_seconds"), "{stderr}");
    // The same from a flag and from the environment; and a router refuses the same way.
    for (args, env) in [
        (vec!["site", "--name", "x", "--region", "r", "--set", "limits.deadline_seconds=3"], None),
        (vec!["site", "--name", "x", "--region", "r"], Some(("ATOLL_LIMITS__DEADLINE_SECONDS", "3"))),
        (vec!["router", "--set", "routing.health.fall=0"], None),
    ] {
        let mut cmd = Command::new(ATOLL);
        cmd.args(&args).args(["--listen", "127.0.0.1:0", "--data"]).arg(dir.path().join("data"));
        if args[0] == "router" {
            cmd = Command::new(ATOLL);
            cmd.args(&args).args(["--listen", "127.0.0.1:0"]);
        }
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.env("ATOLL_ADMIN_TOKEN", TOKEN).output().expect("run");
        assert!(!out.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let field = if args[0] == "router" { "routing.health.fall" } else { "deadline_seconds" };
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    }
}

#[test]
fn a_config_flag_overrides_the_file() {
    let site = crate::Site::start_with(
        "a",
        &["--set", "admin.max_upload_bytes=1000"],
        Some("[admin]\nmax_upload_bytes = 100000000\n"),
    );
    let r = site.admin("PUT", "/_atoll/apps/hello", Some(&crate::read(atoll_test_guests::HELLO)));
    assert_eq!(r.status, 413, "the flag's 1000-byte cap applies: {}", r.body);
}

#[test]
fn a_site_with_peers_refuses_to_start_without_a_usable_peer_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = |secret: Option<&str>| {
        let mut cmd = Command::new(ATOLL);
        cmd.args(["site", "--name", "x", "--region", "r", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join("data"))
            .args(["--peer", "http://127.0.0.1:9"])
            .env("ATOLL_ADMIN_TOKEN", TOKEN)
            .env_remove("ATOLL_PEER_SECRET");
        if let Some(secret) = secret {
            cmd.env("ATOLL_PEER_SECRET", secret);
        }
        let out = cmd.output().expect("run");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(start(None).contains("ATOLL_PEER_SECRET is not set"));
    assert!(start(Some("short")).contains("at least 16 characters"));
}
