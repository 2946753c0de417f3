//! WASI 0.3 handlers (`wasi:http/handler@0.3.0`, built with spin-sdk 7) beside WASI 0.2 ones:
//! served, contained, capped and replicated the same way.

use super::*;

const WAIT: Duration = Duration::from_secs(30);

/// The `world` the site reports for `app`.
fn world_of(site: &Site, app: &str) -> String {
    let r = site.admin("GET", &format!("/_atoll/apps/{app}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let info: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    info["world"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_wasi_0_2_and_a_wasi_0_3_app_are_served_side_by_side_and_each_world_is_shown() {
    let site = Site::start("worlds");
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    site.deploy("spin", atoll_test_guests::SPIN_HELLO, &[]);
    for _ in 0..20 {
        let old = site.get("/apps/hello/x");
        assert_eq!(old.status, 200, "{old:?}");
        let new = site.get("/apps/spin/x");
        assert_eq!(new.status, 200, "{new:?}");
        assert_eq!(
            new.body,
            "Hello from a Spin app on Atoll site worlds in region us-east! You asked for /x\n"
        );
        assert_eq!(new.headers["x-atoll-site"], "worlds");
    }
    assert_eq!(world_of(&site, "hello"), "wasi:http@0.2");
    assert_eq!(world_of(&site, "spin"), "wasi:http@0.3");
    // `atoll apps` shows it too.
    let out = atoll(&["apps", "--site", &site.url]);
    let out = String::from_utf8_lossy(&out.stdout);
    let line = out.lines().find(|l| l.starts_with("spin ")).unwrap_or_default().to_owned();
    assert!(line.contains("wasi:http@0.3"), "{out}");
    // A fresh instance per request: state in the guest never survives (the counter of probe3's
    // `/` would say otherwise), and the guest's log lines carry the request id.
    site.deploy("probe3", atoll_test_guests::PROBE3, &[]);
    let r = request("GET", &format!("{}/apps/probe3/", site.url), &[("x-request-id", "p3-req-1")], None);
    assert_eq!((r.status, r.body.as_str()), (200, "probe3 1\n"));
    let again = site.get("/apps/probe3/");
    assert_eq!(again.body, "probe3 1\n", "a new instance for every request");
    eventually(Duration::from_secs(10), "the guest's log line with its request id", || {
        let log = site.stderr();
        log.lines().any(|l| l.contains("probe3 served") && l.contains("p3-req-1")).then_some(())
    });
}

#[test]
fn hostile_wasi_0_3_guests_are_contained_while_another_app_serves() {
    let site = Site::start("hostile3");
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    site.deploy("probe3", atoll_test_guests::PROBE3, &["--deadline-ms", "2000", "--memory-mb", "16"]);
    let base = format!("{}/apps/probe3", site.url);
    let hostile: Vec<_> = ["loop", "sleep?ms=60000"]
        .into_iter()
        .map(|route| {
            let url = format!("{base}/{route}");
            std::thread::spawn(move || (route, request("GET", &url, &[], None)))
        })
        .collect();
    // While they run, the other app serves.
    for _ in 0..10 {
        assert_eq!(site.get("/apps/hello/").status, 200);
    }
    for handle in hostile {
        let (route, r) = handle.join().expect("join");
        assert_eq!(r.status, 504, "{route}: {r:?}");
        assert!(r.body.contains("deadline of 2000 ms"), "{route}: {}", r.body);
    }
    // A body that never ends streams until the deadline, then is cut short: never complete.
    let (head, rest) = raw_get(&site, "/apps/probe3/forever");
    assert!(head.starts_with("http/1.1 200") && head.contains("transfer-encoding: chunked"), "{head}");
    assert!(rest.contains("line 0\n") && !rest.ends_with("0\r\n\r\n"), "no final chunk: {rest}");
    eventually(WAIT, "the cut logged", || {
        site.stderr()
            .contains(
                "streamed response cut short: the handler did not finish within its deadline of 2000 ms",
            )
            .then_some(())
    });
    let grow = site.get("/apps/probe3/grow");
    assert_eq!(grow.status, 500, "{grow:?}");
    let trap = site.get("/apps/probe3/trap");
    assert_eq!(trap.status, 500, "{trap:?}");
    // An async wait within the deadline is served.
    let slept = site.get("/apps/probe3/sleep?ms=50");
    assert_eq!((slept.status, slept.body.as_str()), (200, "slept 50 ms\n"));
    assert_eq!(site.get("/apps/probe3/").status, 200, "the app serves its next request");
    assert_eq!(site.get("/_atoll/health").status, 200);
}

#[test]
fn wasi_0_3_bodies_are_capped_both_ways() {
    let config = "[limits]\nmax_request_body_bytes = 100000\nmax_response_body_bytes = 200000\n";
    let site = Site::start_with("bodies3", &[], Some(config));
    site.deploy("probe3", atoll_test_guests::PROBE3, &[]);
    let echo = format!("{}/apps/probe3/echo", site.url);
    let within = request("POST", &echo, &[], Some(&[b'a'; 100_000]));
    assert_eq!((within.status, within.body.as_str()), (200, "100000 aaaaaaaaaaaaaaaa\n"));
    let past = request("POST", &echo, &[], Some(&[b'a'; 100_001]));
    assert_eq!(past.status, 413, "{past:?}");
    assert!(past.body.contains("100000 bytes"), "{}", past.body);
    // A body the guest writes after returning its response (in 64 KiB chunks) arrives whole.
    let big = site.get("/apps/probe3/big?n=200000");
    assert_eq!((big.status, big.body.len()), (200, 200_000));
    let too_big = site.get("/apps/probe3/big?n=200001");
    assert_eq!(too_big.status, 500, "{too_big:?}");
    assert!(too_big.body.contains("200000 bytes"), "{}", too_big.body);
}

#[test]
fn a_wasi_0_3_app_deployed_at_one_site_serves_at_its_peers() {
    let a = Site::start_with("p3-a", &["--region", "us-east"], None);
    let b = Site::start_with("p3-b", &["--region", "eu-west", "--peer", &a.url], None);
    a.deploy("spin", atoll_test_guests::SPIN_HELLO, &[]);
    eventually(WAIT, "the app at p3-b", || {
        let r = request("GET", &format!("{}/apps/spin/", b.url), &[("x-atoll-region", "eu-west")], None);
        (r.status == 200 && r.headers.get("x-atoll-site").is_some_and(|s| s == "p3-b")).then_some(r.body)
    });
    assert_eq!(world_of(&b, "spin"), "wasi:http@0.3");
}

#[test]
fn a_wasi_0_3_guest_calls_out_only_to_its_allowed_hosts() {
    let site = Site::start("egress3");
    let target = format!("{}/_atoll/health", site.url);
    let host = site.url.trim_start_matches("http://").to_owned();
    site.deploy("closed", atoll_test_guests::PROBE3, &[]);
    site.deploy("open", atoll_test_guests::PROBE3, &["--allow-host", &host]);
    let denied = site.get(&format!("/apps/closed/fetch?url={target}"));
    assert_eq!(denied.status, 502, "{denied:?}");
    assert!(denied.body.contains("HttpRequestDenied"), "{}", denied.body);
    let allowed = site.get(&format!("/apps/open/fetch?url={target}"));
    assert_eq!((allowed.status, allowed.body.as_str()), (200, "fetched: 200\n"));
}

/// Spin's key-value store, replicated: a Spin counter incremented at two sites reads the sum at a
/// third, and the store labels it was deployed with hold at every site.
#[test]
fn the_spin_counter_incremented_at_two_sites_reads_the_sum_at_a_third() {
    use crate::replication::FAST;
    let a = Site::start_with("spin-a", &["--region", "us-east"], Some(FAST));
    let b = Site::start_with("spin-b", &["--region", "eu-west", "--peer", &a.url], Some(FAST));
    let c = Site::start_with("spin-c", &["--region", "ap-south", "--peer", &a.url], Some(FAST));
    // A label that is not one is refused at deploy, and nothing is deployed.
    let out = atoll(&[
        "deploy",
        "--site",
        &a.url,
        "--app",
        "counter",
        "--kv-store",
        "Bad Label",
        atoll_test_guests::SPIN_COUNTER,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kv_stores"), "{out:?}");
    a.deploy("counter", atoll_test_guests::SPIN_COUNTER, &["--kv-store", "sessions"]);
    for site in [&b, &c] {
        eventually(WAIT, &format!("the counter at {}", site.name), || {
            (site.admin("GET", "/_atoll/apps/counter", None).status == 200).then_some(())
        });
    }
    let post = |site: &Site, region: &str| {
        let r = request(
            "POST",
            &format!("{}/apps/counter/visits", site.url),
            &[("x-atoll-region", region)],
            None,
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.headers["x-atoll-site"], site.name.as_str());
    };
    for _ in 0..7 {
        post(&a, "us-east");
    }
    for _ in 0..5 {
        post(&b, "eu-west");
    }
    eventually(WAIT, "12 visits read at spin-c", || {
        let r = request(
            "GET",
            &format!("{}/apps/counter/visits", c.url),
            &[("x-atoll-region", "ap-south")],
            None,
        );
        (r.body == "12\n").then_some(())
    });
    let get = |site: &Site, region: &str, path: &str| {
        request("GET", &format!("{}/apps/counter{path}", site.url), &[("x-atoll-region", region)], None)
    };
    assert_eq!(get(&c, "ap-south", "/_open/sessions").body, "opened\n");
    let denied = get(&c, "ap-south", "/_open/other");
    assert_eq!((denied.status, denied.body.as_str()), (403, "Error::AccessDenied\n"));
}

/// Variables set at deploy (`--var`, `--var-file`), signed and replicated with the deploy: read
/// by the guest at every site through Spin 4's, Spin 2's and wasi:config's interfaces, never
/// shown by `atoll apps`, the API, the status page or any site's log; a bad name refused with
/// the previous version still serving.
#[test]
fn variables_set_at_deploy_are_read_at_every_site_and_never_shown() {
    use crate::replication::FAST;
    const SECRET: &str = "s3cr3t-v4lue-0f-the-api-key";
    let a = Site::start_with_env("vars-a", &["--region", "us-east"], Some(FAST), &[("RUST_LOG", "debug")]);
    let b = Site::start_with("vars-b", &["--region", "eu-west", "--peer", &a.url], Some(FAST));
    let c = Site::start_with("vars-c", &["--region", "ap-south", "--peer", &a.url], Some(FAST));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("vars.env");
    std::fs::write(
        &file,
        format!("# the app's settings\n\ngreeting=hello from a file\napi_key={SECRET}\nstep=1\n"),
    )
    .expect("write the var file");
    let file = file.display().to_string();
    // The command line overrides the file.
    a.deploy("counter", atoll_test_guests::SPIN_COUNTER, &["--var-file", &file, "--var", "step=3"]);
    a.deploy("spin2", atoll_test_guests::SPIN2, &["--var", "greeting=hi=there", "--var", "empty="]);
    let get = |site: &Site, region: &str, path: &str| {
        request("GET", &format!("{}/apps{path}", site.url), &[("x-atoll-region", region)], None)
    };
    for (site, region) in [(&a, "us-east"), (&b, "eu-west"), (&c, "ap-south")] {
        eventually(WAIT, &format!("the variables at {}", site.name), || {
            (get(site, region, "/counter/_var/greeting").body == "hello from a file\n"
                && get(site, region, "/spin2/var/greeting").body == "hi=there")
                .then_some(())
        });
        assert_eq!(get(site, region, "/counter/_var/api_key").body, format!("{SECRET}\n"));
        assert_eq!(get(site, region, "/counter/_config/step").body, "3\n");
        assert_eq!(get(site, region, "/spin2/config/empty").body, "");
        let unset = get(site, region, "/spin2/var/unset");
        assert_eq!((unset.status, unset.body.as_str()), (409, "Error::Undefined(\"unset\")"));
        let r =
            request("POST", &format!("{}/apps/counter/hits", site.url), &[("x-atoll-region", region)], None);
        assert_eq!(r.status, 200, "{r:?}");
    }
    // `step` = 3 at each of the three sites.
    eventually(WAIT, "9 hits", || (get(&c, "ap-south", "/counter/hits").body == "9\n").then_some(()));

    // Shown nowhere: the CLI, the API, the status page.
    let apps = atoll(&["apps", "--site", &b.url]);
    assert!(apps.status.success());
    let api = b.admin("GET", "/_atoll/apps/counter", None);
    assert!(
        api.body.contains("api_key") && api.body.contains("greeting"),
        "the names are shown: {}",
        api.body
    );
    let state = b.get("/_atoll/ui/state");
    for shown in [String::from_utf8_lossy(&apps.stdout).into_owned(), api.body, state.body] {
        assert!(!shown.contains(SECRET) && !shown.contains("hello from a file"), "{shown}");
    }

    // A bad name (or a line that is not NAME=VALUE) is refused before anything is sent: the
    // previous version keeps its variables.
    // A token given without its name (base64, so with '=') is not echoed back.
    let token_alone = "R2l2ZW5XaXRob3V0QU5hbWU=";
    for bad in [
        &["--var", "API_KEY=x"][..],
        &["--var", "api__key=x"],
        &["--var", "no_equals_sign"],
        &["--var", token_alone],
    ] {
        let mut args =
            vec!["deploy", "--site", a.url.as_str(), "--app", "counter", atoll_test_guests::SPIN_COUNTER];
        args.extend_from_slice(bad);
        let out = atoll(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--var #1"), "{bad:?}: {err}");
        assert!(!err.contains("R2l2ZW5XaXRob3V0QU5hbWU"), "{err}");
    }
    // ... and by the site itself, from a client that skips the check.
    let vars = atoll_deploy::encode_vars(&[("Bad-Name".to_owned(), "x".to_owned())].into());
    let auth = format!("Bearer {TOKEN}");
    let refused = request(
        "PUT",
        &format!("{}/_atoll/apps/counter", a.url),
        // As `atoll deploy` does: the refusal comes before the component is sent.
        &[("authorization", &auth), ("x-atoll-deploy-vars", &vars), ("expect", "100-continue")],
        Some(&read(atoll_test_guests::SPIN_COUNTER)),
    );
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(refused.body.contains("\\\"Bad-Name\\\""), "{}", refused.body);
    assert_eq!(get(&a, "us-east", "/counter/_var/api_key").body, format!("{SECRET}\n"));

    // SIGKILLed and restarted on its data dir, a site still has them (its registry).
    assert!(!c.stderr().contains(SECRET), "vars-c logged the secret");
    let c = c.kill_and_restart();
    eventually(WAIT, "the variables at vars-c after a restart", || {
        (get(&c, "ap-south", "/counter/_var/api_key").body == format!("{SECRET}\n")).then_some(())
    });

    // A deploy without variables leaves none (a deploy says everything the app runs with).
    a.deploy("counter", atoll_test_guests::SPIN_COUNTER, &[]);
    eventually(WAIT, "no variables at vars-c", || {
        (get(&c, "ap-south", "/counter/_var/api_key").body == "Error::Undefined(\"api_key\")\n").then_some(())
    });
    for site in [&a, &b, &c] {
        assert!(!site.stderr().contains(SECRET), "{} logged the secret", site.name);
    }
}

/// A GET over HTTP/1.1 read to the end of the connection: the head, and the body as sent (chunked
/// framing included).
fn raw_get(site: &Site, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(site.url.trim_start_matches("http://")).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").expect("request");
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all);
    let all = String::from_utf8_lossy(&all).into_owned();
    let (head, rest) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    (head.to_ascii_lowercase(), rest.to_owned())
}

/// A body still being written when its head is ready streams to the client as it is written,
/// through a router too; one that ends at once comes whole, with its length.
#[test]
fn a_slow_body_streams_to_the_client_as_it_is_written() {
    let site = Site::start("streams");
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let router = RouterProc::start(&[&site.url], None);
    eventually(WAIT, "the router to route to the site", || {
        (router.get("/apps/probe/static", None).status == 200).then_some(())
    });
    for base in [site.url.as_str(), router.url.as_str()] {
        let mut stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).expect("connect");
        use std::io::{BufRead, Write};
        write!(stream, "GET /apps/probe/drip?n=3&ms=700 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .expect("request");
        let mut reader = std::io::BufReader::new(stream);
        let mut line = String::new();
        let mut seen = Vec::new();
        // Read line by line: "drip 0" must arrive while the guest is still writing the rest.
        let started = std::time::Instant::now();
        while reader.read_line(&mut line).expect("read") > 0 {
            if line.starts_with("drip ") {
                seen.push((line.trim().to_owned(), started.elapsed()));
            }
            line.clear();
        }
        let names: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(names, ["drip 0", "drip 1", "drip 2"], "via {base}");
        assert!(
            seen[2].1 - seen[0].1 >= Duration::from_millis(1000),
            "via {base}: the lines came as they were written (700 ms apart), not all at the end: {seen:?}"
        );
    }
    let (head, _) = raw_get(&site, "/apps/probe/big?bytes=1000");
    assert!(head.contains("content-length: 1000"), "{head}");
}

/// A site SIGKILLed while its response streams through a router: the client's body is cut short
/// (no final chunk), never taken for complete.
#[test]
fn a_site_killed_mid_stream_cuts_the_body_through_a_router() {
    use std::io::{BufRead, Read, Write};
    let mut site = Site::start("killed-mid-stream");
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let router = RouterProc::start(&[&site.url], None);
    eventually(WAIT, "the router to route to the site", || {
        (router.get("/apps/probe/static", None).status == 200).then_some(())
    });
    let stream = std::net::TcpStream::connect(router.url.trim_start_matches("http://")).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut reader = std::io::BufReader::new(stream);
    write!(
        reader.get_mut(),
        "GET /apps/probe/drip?n=50&ms=200 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .expect("request");
    let mut seen = String::new();
    let mut line = String::new();
    while !seen.contains("drip 0") {
        line.clear();
        assert!(reader.read_line(&mut line).expect("read") > 0, "ended before the first line: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.to_ascii_lowercase().starts_with("http/1.1 200"), "{seen}");
    site.kill();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("drip 49"), "the body did not go on after the kill: {rest}");
    assert!(!rest.ends_with("0\r\n\r\n"), "no final chunk: the body is not taken for complete: {rest:?}");
}
