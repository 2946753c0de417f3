//! Cheap refusals: what a client without credentials, or a slow, idle or greedy one, can make a
//! site hold. Each test is the attack, by real sockets against a real site, and what must hold
//! meanwhile.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::*;

fn addr(site: &Site) -> String {
    site.url.trim_start_matches("http://").to_owned()
}

/// Whether the server has closed `stream`: a read returns end of file or an error within
/// `wait` (a read that times out means it is still open).
fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a response (408, say) before the close
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn an_unauthenticated_30_mib_sync_body_is_refused_without_being_read() {
    let site = Site::start("unread");
    let before = site.get("/_atoll/sync/status").body;
    let len = 30usize << 20;
    // A proof that looks right (fresh time, the length it claims) but has no secret behind it.
    let proof = format!(
        "v3 {} 0123456789abcdef {len} {} {}",
        replication::now_ms(),
        "ab".repeat(16),
        "cd".repeat(16)
    );
    let mut stream = TcpStream::connect(addr(&site)).expect("connect");
    let head = format!(
        "POST /_atoll/sync HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\nx-atoll-sync-auth: {proof}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("head");
    let chunk = vec![0u8; 64 << 10];
    stream.write_all(&chunk).expect("the first 64 KiB");
    // The refusal comes while the body is still being sent...
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut answer = [0u8; 512];
    let n = stream.read(&mut answer).expect("an answer before the body was sent");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("signature does not match"), "{answer}");
    // ...and the rest is not read: the connection is closed under the sender, who cannot send
    // the 30 MiB (at most what the kernels' buffers take).
    let mut sent = chunk.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    stream.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    while sent < len && Instant::now() < deadline {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < len / 2, "the site read {sent} bytes of an unauthenticated body");
    // Nothing changed; the site serves.
    assert_eq!(site.get("/_atoll/health").status, 200);
    let after = json(&site.get("/_atoll/sync/status").body);
    assert_eq!(after["peers"], json(&before)["peers"]);
    assert!(site.stderr().contains("refused a sync request"), "the refusal is logged");
}

#[test]
fn a_slowloris_client_is_cut_off_while_other_clients_are_served() {
    let site = Site::start_with("slow", &[], Some("[server]\nheader_read_timeout_ms = 1000\n"));
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    // One sends its headers a byte at a time; another connects and sends nothing at all.
    let mut slow = TcpStream::connect(addr(&site)).expect("connect");
    slow.write_all(b"GET /apps/hello/ HTTP/1.1\r\nhost: x\r\nx-slow: ").expect("start");
    let mut silent = TcpStream::connect(addr(&site)).expect("connect");
    let started = Instant::now();
    let mut cut_off = false;
    while started.elapsed() < Duration::from_secs(20) {
        if slow.write_all(b"a").is_err() || closed_by_server(&mut slow, Duration::from_millis(200)) {
            cut_off = true;
            break;
        }
        // Others are served meanwhile.
        assert_eq!(site.get("/apps/hello/").status, 200);
    }
    assert!(cut_off, "a client sending one header byte every 200 ms was never cut off");
    assert!(closed_by_server(&mut silent, Duration::from_secs(10)), "a silent connection stays open");
    assert_eq!(site.get("/apps/hello/").status, 200);
}

#[test]
fn a_thousand_idle_connections_are_shed_and_the_site_keeps_serving() {
    let config = "[server]\nmax_connections = 100\nheader_read_timeout_ms = 1500\nidle_timeout_ms = 3000\n";
    let site = Site::start_with("idle", &[], Some(config));
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    // A keep-alive client that made one request, then went quiet.
    let mut kept = TcpStream::connect(addr(&site)).expect("connect");
    kept.write_all(b"GET /apps/hello/ HTTP/1.1\r\nhost: x\r\n\r\n").expect("request");
    let mut buf = [0u8; 1024];
    kept.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    assert!(kept.read(&mut buf).expect("response") > 0);
    let mut idle: Vec<TcpStream> =
        (0..1000).map(|_| TcpStream::connect(addr(&site)).expect("connect an idle client")).collect();
    // Far past the connection cap: a new client waits for the idle ones to be shed, then is served.
    let served = request("GET", &format!("{}/apps/hello/", site.url), &[], None);
    assert_eq!(served.status, 200, "{served:?}");
    let metrics = site.get("/metrics").body;
    assert!(metrics.contains("atoll_connections_at_cap_total"), "the cap was reached and counted");
    assert!(site.stderr().contains("at the connection cap"), "the cap is logged");
    // Every idle connection is closed by the site (the ones still queued once they are taken).
    let deadline = Instant::now() + Duration::from_secs(90);
    for stream in &mut idle {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        assert!(closed_by_server(stream, left), "an idle connection was never closed");
    }
    assert!(closed_by_server(&mut kept, Duration::from_secs(10)), "an idle keep-alive connection stays open");
    assert_eq!(site.get("/apps/hello/").status, 200);
}

#[test]
fn an_app_holding_its_whole_share_of_instances_leaves_the_others_serving() {
    // Four instances in all; an app may hold two of them.
    let site = Site::start_with("share", &[], Some("[runtime]\nmax_instances = 4\n"));
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    site.deploy("probe", atoll_test_guests::PROBE, &["--deadline-ms", "4000"]);
    let url = format!("{}/apps/probe/loop", site.url);
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || request("GET", &url, &[], None))
        })
        .collect();
    eventually(Duration::from_secs(30), "two requests to be looping", || {
        (site.stderr().matches("probe: looping").count() >= 2).then_some(())
    });
    // The greedy app holds its share; every other app is served.
    for _ in 0..5 {
        let hello = site.get("/apps/hello/");
        assert_eq!(hello.status, 200, "{hello:?}");
    }
    let statuses: Vec<Response> = loops.into_iter().map(|t| t.join().expect("join")).collect();
    let refused: Vec<&Response> = statuses.iter().filter(|r| r.status == 503).collect();
    assert_eq!(refused.len(), 2, "two requests over the app's share: {statuses:?}");
    assert!(refused.iter().all(|r| r.body.contains("share of 2 instances")), "{refused:?}");
    assert_eq!(statuses.iter().filter(|r| r.status == 504).count(), 2, "{statuses:?}");
    assert_eq!(site.get("/apps/probe/static").status, 200, "the app is served again once its requests end");
}

#[test]
fn request_bodies_held_for_guests_count_against_one_cap() {
    // One MiB for every guest's request bodies together (and so for any one body).
    let config = "[runtime]\nmax_buffered_body_mb = 1\n[limits]\nmax_request_body_bytes = 1048576\n\
                  max_response_body_bytes = 1048576\n";
    let site = Site::start_with("bodies", &[], Some(config));
    site.deploy("probe", atoll_test_guests::PROBE, &["--deadline-ms", "3000"]);
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    let body = vec![b'x'; 700 << 10];
    let held = {
        let (url, body) = (format!("{}/apps/probe/loop", site.url), body.clone());
        std::thread::spawn(move || request("POST", &url, &[], Some(&body)))
    };
    eventually(Duration::from_secs(30), "the first request to be running", || {
        site.stderr().contains("probe: looping").then_some(())
    });
    // The site refuses while the body comes in, and closes: the client may still be writing the
    // body then, and a reset can destroy the answer before it is read (there is no lingering
    // close). So: the answer when it arrives, else the refusal in the site's log.
    let mut stream = TcpStream::connect(addr(&site)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let head = format!("POST /apps/hello/ HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body));
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if answer.is_empty() {
        eventually(Duration::from_secs(10), "the refusal in the site's log", || {
            site.stderr().contains("bytes of request bodies already").then_some(())
        });
    } else {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("bytes of request bodies"), "{answer}");
    }
    assert_eq!(site.get("/apps/hello/").status, 200, "requests without bodies are served");
    assert_eq!(held.join().expect("join").status, 504);
    let again = request("POST", &format!("{}/apps/hello/", site.url), &[], Some(&body));
    assert_eq!(again.status, 200, "the memory is given back when the first request ends: {again:?}");
}

#[test]
fn a_client_that_does_not_read_its_response_is_dropped() {
    let config = "[server]\nidle_timeout_ms = 2000\n[limits]\nmax_response_body_bytes = 67108864\n";
    let site = Site::start_with("unread-response", &[], Some(config));
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let len = 48usize << 20;
    let mut stream = TcpStream::connect(addr(&site)).expect("connect");
    let head = format!("GET /apps/probe/big?bytes={len} HTTP/1.1\r\nhost: x\r\n\r\n");
    stream.write_all(head.as_bytes()).expect("request");
    // The attack: never read. The site's buffers and the kernel's fill up; then nothing moves.
    eventually(Duration::from_secs(60), "the stalled connection to be dropped", || {
        site.get("/metrics").body.contains("atoll_connections_stalled_closed_total").then_some(())
    });
    // What arrives is cut short: the site let go of the rest.
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    assert!(received < len, "all {received} bytes arrived: the connection was not dropped");
    assert_eq!(site.get("/apps/probe/static").status, 200, "the site serves others");
}

#[test]
fn a_replayed_or_stale_sync_head_is_refused_before_its_body_is_read() {
    use atoll_sync::message::{Request, encode};
    let site = Site::start("heads");
    let secret = atoll_sync::auth::Secret::new(crate::PEER_SECRET).expect("secret");
    let body = encode(&Request::Push(replication::intruder(), vec![]));
    let proof = secret.sign(replication::now_ms(), &site.name, "/_atoll/sync", &body);
    let taken = request(
        "POST",
        &format!("{}/_atoll/sync", site.url),
        &[("x-atoll-sync-auth", proof.as_str())],
        Some(&body),
    );
    assert_eq!(taken.status, 200, "{taken:?}");
    // A head captured on the wire, sent again without its body: refused at once, not waited on.
    let send_head = |proof: &str, len: usize| -> String {
        let mut stream = TcpStream::connect(addr(&site)).expect("connect");
        let head = format!(
            "POST /_atoll/sync HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\nx-atoll-sync-auth: {proof}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).expect("head");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut answer = [0u8; 512];
        let n = stream.read(&mut answer).expect("an answer without sending the body");
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    let replayed = send_head(&proof, body.len());
    assert!(replayed.starts_with("HTTP/1.1 409"), "{replayed}");
    // A genuine head from two minutes ago, claiming a large body: refused by its time.
    let old = secret.sign(replication::now_ms() - 120_000, &site.name, "/_atoll/sync", &vec![0u8; 1 << 20]);
    let stale = send_head(&old, 1 << 20);
    assert!(stale.starts_with("HTTP/1.1 401"), "{stale}");
    assert!(stale.contains("timestamp"), "{stale}");
}

#[test]
fn an_http2_client_that_gives_no_window_is_dropped() {
    let config = "[server]\nidle_timeout_ms = 2000\n";
    let site = Site::start_with("no-window", &[], Some(config));
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let address = addr(&site);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let ended = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(address).await.expect("connect");
        // The attack: a flow-control window of 0, never opened. The site can send no DATA; its
        // writes never block either (nothing is written), and the request stays in flight.
        let (mut client, connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .expect("h2");
        let connection = tokio::spawn(connection);
        let mut responses = Vec::new();
        for _ in 0..10 {
            let request =
                http::Request::get("http://x/apps/probe/big?bytes=1048576").body(()).expect("request");
            let (response, _) = client.send_request(request, true).expect("send");
            responses.push(response);
        }
        // The heads arrive (HEADERS need no window); the bodies never can. Held, not read.
        let mut held = Vec::new();
        for response in responses {
            let response = response.await.expect("a head");
            assert_eq!(response.status(), 200);
            held.push(response);
        }
        let ended = tokio::time::timeout(Duration::from_secs(60), connection).await;
        drop((held, client));
        ended
    });
    assert!(ended.is_ok(), "the connection was still open a minute later");
    assert!(site.get("/metrics").body.contains("atoll_connections_stalled_closed_total"));
    assert_eq!(site.get("/apps/probe/static").status, 200, "the site serves others");
}

#[test]
fn a_client_that_hangs_up_frees_its_instance_at_once() {
    // Two instances in all: the probe app's share is one.
    let site = Site::start_with("hangup", &[], Some("[runtime]\nmax_instances = 2\n"));
    site.deploy("probe", atoll_test_guests::PROBE, &["--deadline-ms", "60000"]);
    let mut stream = TcpStream::connect(addr(&site)).expect("connect");
    stream.write_all(b"GET /apps/probe/loop HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    eventually(Duration::from_secs(30), "the request to be looping", || {
        site.stderr().contains("probe: looping").then_some(())
    });
    // Its instance is held: the app's next request is over its share.
    let held = site.get("/apps/probe/static");
    assert_eq!(held.status, 503, "{held:?}");
    // The client hangs up: the guest stops and the instance is free long before the deadline.
    drop(stream);
    eventually(Duration::from_secs(15), "the app served again", || {
        (site.get("/apps/probe/static").status == 200).then_some(())
    });
}
