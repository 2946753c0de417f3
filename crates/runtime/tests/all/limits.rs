//! Hostile guests fail only their own request, with the documented status.

use super::*;

#[tokio::test]
async fn looping_guest_hits_the_deadline_and_the_next_request_is_served() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, quick_limits());
    let err = get(&app, "/loop").await.expect_err("loop cannot finish");
    assert!(matches!(err, HandleError::Deadline { .. }), "{err:?}");
    assert_eq!(err.status(), 504);
    assert_eq!(get(&app, "/static").await.expect("served"), (200, "1\n".into()));
}

#[tokio::test]
async fn sleeping_guest_hits_the_deadline() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, quick_limits());
    let err = get(&app, "/sleep?ms=60000").await.expect_err("sleep outlasts deadline");
    assert_eq!(err.status(), 504, "{err:?}");
}

#[tokio::test]
async fn trapping_guest_gets_500_and_the_next_request_is_served() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, quick_limits());
    let err = get(&app, "/trap").await.expect_err("trap");
    assert!(matches!(err, HandleError::Trap(_)), "{err:?}");
    assert_eq!(err.status(), 500);
    assert_eq!(get(&app, "/static").await.expect("served").0, 200);
}

#[tokio::test]
async fn memory_hungry_guest_is_capped() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, quick_limits());
    let err = get(&app, "/oom").await.expect_err("cannot allocate forever");
    assert!(matches!(err, HandleError::Trap(_)), "{err:?}");
    assert_eq!(get(&app, "/static").await.expect("served").0, 200);
}

#[tokio::test]
async fn oversized_request_body_is_refused_before_the_guest_runs() {
    let rt = runtime();
    let mut settings = quick_limits();
    settings.limits.max_request_body = 1024;
    let app = load(&rt, atoll_test_guests::PROBE, settings);
    let request = http::Request::post("http://example.com/echo")
        .body(http_body_util::Full::new(Bytes::from(vec![0u8; 1025])))
        .expect("valid request");
    let err = app.handle(request, "r").await.expect_err("too large");
    assert!(matches!(err, HandleError::RequestBodyTooLarge { limit: 1024 }), "{err:?}");
    assert_eq!(err.status(), 413);
}

#[tokio::test]
async fn oversized_response_body_is_an_error() {
    let rt = runtime();
    let mut settings = quick_limits();
    settings.limits.max_response_body = 1000;
    let app = load(&rt, atoll_test_guests::PROBE, settings);
    assert_eq!(get(&app, "/big?bytes=1000").await.expect("at the cap").1.len(), 1000);
    let err = get(&app, "/big?bytes=1001").await.expect_err("over the cap");
    assert!(matches!(err, HandleError::ResponseBodyTooLarge { limit: 1000 }), "{err:?}");
}

#[tokio::test]
async fn a_full_pool_answers_at_capacity_not_a_crash() {
    let rt = Runtime::new(RuntimeConfig { max_instances: 1, ..RuntimeConfig::default() }).expect("runtime");
    let mut settings = quick_limits();
    settings.limits.deadline = Duration::from_secs(60);
    let app = load(&rt, atoll_test_guests::PROBE, settings);
    // A request that holds the only slot until it is cancelled. (It retries while the loop
    // below holds the slot: a running guest yields at epoch ticks, so the two interleave.)
    let holder = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                match get(&app, "/sleep?ms=60000").await {
                    Err(HandleError::AtCapacity) => tokio::time::sleep(Duration::from_millis(1)).await,
                    other => return other,
                }
            }
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match get(&app, "/static").await {
            Err(HandleError::AtCapacity) => break,
            // The holder has not taken the slot yet: let it run.
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            other => panic!("expected AtCapacity while the slot is held, got {other:?}"),
        }
    }
    assert_eq!(HandleError::AtCapacity.status(), 503);
    // Cancelling the holder frees its slot: the next request is served.
    holder.abort();
    let _ = holder.await;
    assert_eq!(get(&app, "/static").await.expect("served once the slot is free"), (200, "1\n".into()));
}

#[tokio::test]
async fn the_instance_cap_holds_over_wasi_0_2_and_0_3_handlers_together() {
    // Two instances site-wide; each engine's pool alone would have room for two.
    let rt = Runtime::new(RuntimeConfig { max_instances: 2, ..RuntimeConfig::default() }).expect("runtime");
    let wasm = |path: &str| std::fs::read(path).expect("built");
    let load = |name: &str, path: &str| rt.load(name, &wasm(path), AppSettings::default()).expect("loads");
    let spin = load("spin", atoll_test_guests::SPIN_HELLO);
    // Two WASI 0.2 guests hold both instances while they sleep.
    let held: Vec<_> = ["slow-1", "slow-2"]
        .into_iter()
        .map(|name| {
            let app = load(name, atoll_test_guests::PROBE);
            tokio::spawn(async move { get(&app, "/sleep?ms=1500").await })
        })
        .collect();
    // The test's runtime is single-threaded: one yield lets both take their instance.
    tokio::task::yield_now().await;
    let mut refused = false;
    for _ in 0..100 {
        match get(&spin, "/").await {
            Err(HandleError::AtCapacity) => {
                refused = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("expected AtCapacity or a response, got {other:?}"),
        }
    }
    for handle in held {
        assert_eq!(handle.await.expect("join").expect("served").0, 200);
    }
    assert!(refused, "the WASI 0.3 app is refused while WASI 0.2 ones hold the site's instances");
    assert_eq!(get(&spin, "/").await.expect("served").0, 200, "served once an instance is free");
}
