//! Response bodies: whole when they end soon after the head, streamed as the guest writes them
//! when they do not, cut short (never complete) when they fail after the head has gone.

use super::*;
use atoll_runtime::ResponseBody;
use http_body_util::BodyExt;

async fn serve(app: &App, path: &str) -> http::Response<ResponseBody> {
    let request = http::Request::get(format!("http://example.com{path}"))
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("valid request");
    app.serve(request, "stream-test").await.expect("a head")
}

/// The body's frames as they arrive, and how it ended.
async fn frames(body: &mut ResponseBody) -> (Vec<Bytes>, Option<HandleError>) {
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => frames.extend(frame.into_data().ok()),
            Err(e) => return (frames, Some(e)),
        }
    }
    (frames, None)
}

fn with(deadline_ms: u64, max_response_body: usize) -> AppSettings {
    AppSettings {
        limits: Limits {
            deadline: Duration::from_millis(deadline_ms),
            max_response_body,
            ..Limits::default()
        },
        ..AppSettings::default()
    }
}

#[tokio::test]
async fn a_body_that_ends_at_once_comes_whole_with_its_length() {
    let rt = runtime();
    for (guest, path) in
        [(atoll_test_guests::PROBE, "/big?bytes=70000"), (atoll_test_guests::PROBE3, "/big?n=70000")]
    {
        let app = load(&rt, guest, AppSettings::default());
        let mut response = serve(&app, path).await;
        assert!(!response.body().is_streamed(), "{guest}");
        assert_eq!(http_body::Body::size_hint(response.body()).exact(), Some(70_000));
        let (frames, end) = frames(response.body_mut()).await;
        assert!(end.is_none());
        assert_eq!(frames.iter().map(Bytes::len).sum::<usize>(), 70_000);
    }
}

#[tokio::test]
async fn a_body_written_slowly_is_streamed_as_it_is_written() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, AppSettings::default());
    let mut response = serve(&app, "/drip?n=5&ms=150").await;
    assert_eq!(response.status(), 200);
    assert!(response.body().is_streamed(), "the first line is 150 ms away: the head goes first");
    let (frames, end) = frames(response.body_mut()).await;
    assert!(end.is_none(), "{end:?}");
    let text: String = frames.iter().map(|f| String::from_utf8_lossy(f)).collect();
    assert_eq!(text, "drip 0\ndrip 1\ndrip 2\ndrip 3\ndrip 4\n");
    assert!(frames.len() >= 3, "the lines arrived as they were written, not at the end: {frames:?}");
}

#[tokio::test]
async fn a_streamed_body_past_its_deadline_is_cut_short_never_complete() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE3, with(1000, 10 << 20));
    let mut response = serve(&app, "/forever").await;
    assert_eq!(response.status(), 200);
    assert!(response.body().is_streamed());
    let (frames, end) = frames(response.body_mut()).await;
    assert!(matches!(end, Some(HandleError::Deadline { .. })), "{end:?}");
    let text: String = frames.iter().map(|f| String::from_utf8_lossy(f)).collect();
    assert!(text.starts_with("line 0\nline 1\n"), "{text}");
    // What could not stream: the same guest, read whole, is the deadline's error.
    assert!(matches!(get(&app, "/forever").await, Err(HandleError::Deadline { .. })));
}

#[tokio::test]
async fn a_streamed_body_past_its_cap_is_cut_short() {
    let rt = runtime();
    // Lines of 7 bytes every 20 ms: the cap is passed at the 8th, after the head has gone.
    let app = load(&rt, atoll_test_guests::PROBE, with(10_000, 50));
    let mut response = serve(&app, "/drip?n=100&ms=20").await;
    assert!(response.body().is_streamed());
    let (frames, end) = frames(response.body_mut()).await;
    assert!(matches!(end, Some(HandleError::ResponseBodyTooLarge { limit: 50 })), "{end:?}");
    assert!(frames.iter().map(Bytes::len).sum::<usize>() <= 50);
}

#[tokio::test]
async fn dropping_a_streamed_body_ends_its_guest_and_frees_its_instance() {
    let rt = Runtime::new(RuntimeConfig {
        max_instances: 4,
        max_instances_per_app: 1,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let app = load(&rt, atoll_test_guests::PROBE3, with(60_000, 10 << 20));
    let mut response = serve(&app, "/forever").await;
    assert!(response.body().is_streamed());
    assert!(response.body_mut().frame().await.is_some(), "a line");
    // The app's one instance is taken while the body streams ...
    assert!(matches!(get(&app, "/").await, Err(HandleError::AppAtCapacity { .. })));
    // ... and given back when the client goes (not at the 60 s deadline).
    drop(response);
    let started = std::time::Instant::now();
    loop {
        match get(&app, "/").await {
            Ok((200, _)) => break,
            Err(HandleError::AppAtCapacity { .. }) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("the instance was not given back: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_wasi_0_2_body_streaming_past_its_deadline_or_trapping_is_cut_short() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, with(700, 10 << 20));
    let mut response = serve(&app, "/drip?n=100&ms=100").await;
    assert!(response.body().is_streamed());
    let (lines, end) = frames(response.body_mut()).await;
    assert!(matches!(end, Some(HandleError::Deadline { .. })), "{end:?}");
    assert!(!lines.is_empty() && lines.len() < 100);
    let app = load(&rt, atoll_test_guests::PROBE, with(10_000, 10 << 20));
    let mut response = serve(&app, "/drip?n=5&ms=150&trap=2").await;
    assert!(response.body().is_streamed());
    let (lines, end) = frames(response.body_mut()).await;
    assert!(matches!(end, Some(HandleError::Trap(_))), "{end:?}");
    let text: String = lines.iter().map(|f| String::from_utf8_lossy(f)).collect();
    assert_eq!(text, "drip 0\ndrip 1\n");
}

#[tokio::test]
async fn a_body_written_byte_by_byte_is_queued_as_bytes_not_a_frame_each() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::PROBE, AppSettings::default());
    let mut response = serve(&app, "/tiny?n=20000").await;
    assert!(response.body().is_streamed());
    // A client that does not read while the guest writes 20,000 one-byte writes: what waits for
    // it is merged (in chunks of 4 KiB), not 20,000 frames.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (chunks, end) = frames(response.body_mut()).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), 20_000);
    assert!(chunks.len() <= 8, "{} frames", chunks.len());
}
