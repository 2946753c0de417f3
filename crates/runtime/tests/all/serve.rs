//! Serving requests: the handler's response, its environment, isolation between requests.

use super::*;

#[tokio::test]
async fn hello_names_site_and_region() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::HELLO, AppSettings::default());
    let (status, body) = get(&app, "/some/path").await.expect("served");
    assert_eq!(status, 200);
    assert!(body.contains("test-site") && body.contains("test-region"), "{body}");
    assert!(body.contains("/some/path"), "{body}");
}

#[tokio::test]
async fn every_request_gets_a_fresh_instance() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, AppSettings::default());
    for _ in 0..5 {
        assert_eq!(get(&app, "/static").await.expect("served"), (200, "1\n".into()));
    }
}

#[tokio::test]
async fn guest_environment_is_exactly_the_configured_one() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, AppSettings::default());
    let (_, body) = get(&app, "/env").await.expect("served");
    assert_eq!(body, "ATOLL_REGION=test-region\nATOLL_SITE=test-site\n");
}

#[tokio::test]
async fn guest_has_no_filesystem() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, AppSettings::default());
    let (status, body) = get(&app, "/files").await.expect("served");
    assert_eq!(status, 200);
    assert!(body.starts_with("read_dir failed"), "{body}");
}

#[tokio::test]
async fn request_body_and_query_reach_the_guest() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, AppSettings::default());
    let request = http::Request::post("http://example.com/echo?x=1")
        .body(http_body_util::Full::new(Bytes::from_static(b"ping")))
        .expect("valid request");
    let response = app.handle(request, "r").await.expect("served");
    assert_eq!(response.headers()["x-probe-path"], "/echo?x=1");
    assert_eq!(response.body().as_ref(), b"ping");
}

#[tokio::test]
async fn outbound_request_to_unlisted_host_is_denied_to_the_guest() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let rt = runtime();
    let settings = AppSettings {
        allowed_hosts: vec!["example.com".into(), "127.0.0.1:1".into()],
        ..AppSettings::default()
    };
    let app = load(&rt, atoll_test_guests::PROBE, settings);
    let (status, body) = get(&app, &format!("/fetch?url=http://127.0.0.1:{port}/")).await.expect("served");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no connection was made: {accepted:?}"
    );
}

#[tokio::test]
async fn outbound_request_to_listed_host_goes_out() {
    // A plain TCP listener that answers one HTTP request stands in for the outside world.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let rt = runtime();
    let settings = AppSettings { allowed_hosts: vec![format!("127.0.0.1:{port}")], ..AppSettings::default() };
    let app = load(&rt, atoll_test_guests::PROBE, settings);
    let (status, body) = get(&app, &format!("/fetch?url=http://127.0.0.1:{port}/")).await.expect("served");
    assert_eq!((status, body.as_str()), (200, "fetched: 204\n"));
}

#[tokio::test]
async fn wasi_0_2_and_wasi_0_3_handlers_are_told_apart_and_both_served() {
    let rt = runtime();
    let old = load(&rt, atoll_test_guests::HELLO, AppSettings::default());
    let new = load(&rt, atoll_test_guests::SPIN_HELLO, AppSettings::default());
    assert_eq!((old.world(), new.world()), (atoll_runtime::World::Http02, atoll_runtime::World::Http03));
    for _ in 0..3 {
        let (status, body) = get(&new, "/p").await.expect("served");
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "Hello from a Spin app on Atoll site test-site in region test-region! You asked for /p\n"
        );
        assert_eq!(get(&old, "/").await.expect("served").0, 200);
    }
}

#[tokio::test]
async fn a_wasi_0_3_guest_sleeping_past_its_deadline_is_cut_off() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE3, quick_limits());
    match get(&app, "/sleep?ms=5000").await {
        Err(HandleError::Deadline { deadline }) => assert_eq!(deadline, Duration::from_millis(500)),
        other => panic!("expected the deadline, got {other:?}"),
    }
    assert_eq!(get(&app, "/sleep?ms=10").await.expect("served"), (200, "slept 10 ms\n".into()));
}
