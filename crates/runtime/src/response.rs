//! A guest's response on its way to the client: sent whole when its body ends soon after the
//! head (nearly always), streamed when it does not.
//!
//! The body is read as the guest writes it. If it ends within [`STREAM_AFTER`] of the head, the
//! response goes out whole, with its length: a body over the cap, or a guest failing while writing
//! it, is still a clean error status. A body still being written then (server-sent events, a slow
//! report) is streamed: the head and what was written so far go out at once, the rest as it comes.
//! A streamed body that fails (cap, deadline, trap) can no longer change the status: it is cut
//! short, which the client sees as a broken body (HTTP/1.1: no final chunk, the connection
//! closed; HTTP/2: the stream reset), never as a complete one.
//!
//! The guest never waits for the client: what it writes is queued here (at most the response
//! cap, the memory a whole body takes anyway, small writes merged so that a body written byte by
//! byte costs bytes, not a frame each), so a client reading slowly holds bytes, not an instance,
//! as when bodies were always read whole.
//!
//! For a WASI 0.3 guest the switch to streaming happens inside the store's event loop: a guest
//! computing without awaiting delays it (to its next await or epoch yield, 10 ms at most).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::HandleError;

/// How long after its head a response's body may go on before it is streamed.
pub const STREAM_AFTER: Duration = Duration::from_millis(100);

/// Writes smaller than this are merged with their neighbours before they are queued.
const MERGE_BELOW: usize = 4096;

/// Chunks of a body in order, small ones merged.
#[derive(Default)]
struct Chunks {
    list: VecDeque<Bytes>,
    /// Small writes not yet a chunk of their own.
    tail: BytesMut,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if self.list.is_empty() && self.tail.is_empty() {
            // The first (nearly always the only) chunk: kept as it is, without a copy.
            self.list.push_back(data);
        } else if data.len() < MERGE_BELOW {
            self.tail.extend_from_slice(&data);
            if self.tail.len() >= MERGE_BELOW {
                self.list.push_back(self.tail.split().freeze());
            }
        } else {
            if !self.tail.is_empty() {
                self.list.push_back(self.tail.split().freeze());
            }
            self.list.push_back(data);
        }
    }

    fn pop(&mut self) -> Option<Bytes> {
        self.list.pop_front().or_else(|| (!self.tail.is_empty()).then(|| self.tail.split().freeze()))
    }

    /// All of them as one buffer (without a copy when there is one chunk).
    fn whole(mut self, total: usize) -> Bytes {
        match (self.list.len(), self.tail.is_empty()) {
            (0, _) => self.tail.freeze(),
            (1, true) => self.list.pop_front().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(total);
                for chunk in self.list.drain(..) {
                    all.extend_from_slice(&chunk);
                }
                all.extend_from_slice(&self.tail);
                all.freeze()
            }
        }
    }
}

/// The streamed rest of a body, between the guest's task (which feeds it) and the client (which
/// drains it): never waits for the reader; bounded by the response cap the feeder counts.
#[derive(Default)]
struct Queue(Mutex<QueueState>);

#[derive(Default)]
struct QueueState {
    chunks: Chunks,
    /// How the body ended, once it has: `Err` cuts it short.
    end: Option<Result<(), HandleError>>,
    /// The feeder went without saying how the body ended.
    abandoned: bool,
    waker: Option<Waker>,
}

impl QueueState {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

impl Queue {
    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The guest's end of a [`Queue`].
struct Feed(Arc<Queue>);

impl Feed {
    /// Queues `data`; false if the reader has gone.
    fn push(&self, data: Bytes) -> bool {
        if Arc::strong_count(&self.0) == 1 {
            return false;
        }
        let mut state = self.0.state();
        state.chunks.push(data);
        state.wake();
        true
    }

    fn end(&self, how: Result<(), HandleError>) {
        let mut state = self.0.state();
        state.end = Some(how);
        state.wake();
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.abandoned = true;
        state.wake();
    }
}

/// The body of a response served by [`crate::App::serve`]: the whole body, or a stream of it.
pub struct ResponseBody(Inner);

enum Inner {
    Whole(Option<Bytes>),
    Stream {
        queue: Arc<Queue>,
        ended: bool,
        /// The guest's task: aborted if the body is dropped before it ends (a client gone).
        _task: Option<crate::app::Abortable<Option<Outcome>>>,
    },
}

/// What a request's task answers: a whole response or the error that is its status (`None`: it
/// streamed, or went without answering).
pub(crate) type Outcome = Result<http::Response<ResponseBody>, HandleError>;

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Whole(bytes) => {
                f.debug_tuple("Whole").field(&bytes.as_ref().map_or(0, Bytes::len)).finish()
            }
            Inner::Stream { .. } => f.write_str("Stream"),
        }
    }
}

impl ResponseBody {
    /// A whole body.
    pub fn whole(bytes: Bytes) -> ResponseBody {
        ResponseBody(Inner::Whole(Some(bytes)))
    }

    /// The bytes of a whole body (not yet read), `None` for a streamed one.
    pub fn whole_bytes(&self) -> Option<&Bytes> {
        match &self.0 {
            Inner::Whole(bytes) => bytes.as_ref(),
            Inner::Stream { .. } => None,
        }
    }

    /// Whether the body is streamed (its end and any failure are still to come).
    pub fn is_streamed(&self) -> bool {
        matches!(self.0, Inner::Stream { .. })
    }

    /// Ties the guest's task to a streamed body, so that dropping the body ends the guest.
    pub(crate) fn hold(&mut self, task: crate::app::Abortable<Option<Outcome>>) {
        if let Inner::Stream { _task, .. } = &mut self.0 {
            *_task = Some(task);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = HandleError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HandleError>>> {
        let (queue, ended) = match &mut self.0 {
            Inner::Whole(bytes) => {
                return Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))));
            }
            Inner::Stream { queue, ended, .. } => (queue, ended),
        };
        if *ended {
            return Poll::Ready(None);
        }
        let mut state = queue.state();
        if let Some(data) = state.chunks.pop() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let end = match state.end.take() {
            Some(how) => how,
            // Never a complete body unless the guest's task said it was.
            None if state.abandoned => {
                Err(HandleError::Internal("the response body ended unexpectedly".into()))
            }
            None => {
                state.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        };
        drop(state);
        *ended = true;
        Poll::Ready(end.err().map(Err))
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Whole(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            Inner::Stream { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream { .. } => SizeHint::default(),
        }
    }
}

/// Where a request's response goes: a whole one (or the error that is its status) is the task's
/// answer; a streamed one's head goes out at once, then its body through a [`Queue`].
pub(crate) struct Reply {
    /// Set when the response is whole, or failed before any of it was sent.
    outcome: Option<Outcome>,
    /// Where the early head of a streamed response goes, until it is sent.
    head: Option<Arc<HeadSlot>>,
    feed: Option<Feed>,
    app: Arc<str>,
    request_id: Arc<str>,
}

/// Where a streamed response's head is put for the caller, who is woken only then: a task that
/// ends without streaming wakes its caller once, by ending (a oneshot's closing would wake it
/// twice, ~2 µs a request).
#[derive(Default)]
pub(crate) struct HeadSlot {
    response: Mutex<Option<http::Response<ResponseBody>>>,
    ready: tokio::sync::Notify,
}

impl HeadSlot {
    /// Waits until a head is put (a head put before the wait counts).
    pub(crate) async fn wait(&self) {
        self.ready.notified().await;
    }

    /// The head, if one was put.
    pub(crate) fn take(&self) -> Option<http::Response<ResponseBody>> {
        self.response.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Reply {
    pub(crate) fn new(app: Arc<str>, request_id: Arc<str>) -> (Reply, Arc<HeadSlot>) {
        let slot = Arc::new(HeadSlot::default());
        (Reply { outcome: None, head: Some(slot.clone()), feed: None, app, request_id }, slot)
    }

    /// The whole response or the error, for the task to answer (`None` once streamed).
    pub(crate) fn outcome(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }

    /// Ends the response with `error`: its status if nothing is sent yet, else the streamed body
    /// cut short.
    pub(crate) fn fail(&mut self, error: HandleError) {
        if let Some(feed) = self.feed.take() {
            let reason = match &error {
                HandleError::Deadline { .. } => "deadline",
                HandleError::ResponseBodyTooLarge { .. } => "cap",
                HandleError::Trap(_) => "trap",
                _ => "other",
            };
            tracing::warn!(app = %self.app, request_id = %self.request_id, reason, "streamed response cut short: {error}");
            metrics::counter!("atoll_responses_cut_total", "app" => self.app.to_string(), "reason" => reason)
                .increment(1);
            feed.end(Err(error));
        } else if self.head.is_some() && self.outcome.is_none() {
            self.outcome = Some(Err(error));
        }
    }

    /// Reads the guest's `response` body (at most `max_body` bytes) and sends it on: whole if it
    /// ends within [`STREAM_AFTER`], else streamed. Returns when the body has ended (or the
    /// client has gone); an error is for [`Reply::fail`].
    pub(crate) async fn send<B>(
        &mut self,
        response: http::Response<B>,
        max_body: usize,
    ) -> Result<(), HandleError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = response.into_parts();
        let mut body = std::pin::pin!(body);
        let mut taken = Taken { chunks: Chunks::default(), total: 0, max: max_body };
        let stream_at = tokio::time::Instant::now() + STREAM_AFTER;
        // Nearly always the body is complete already: read without arming a timer first.
        let mut timer = None;
        loop {
            let frame = match poll_now(body.as_mut()) {
                Some(frame) => frame,
                None => {
                    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(stream_at)));
                    tokio::select! {
                        frame = body.frame() => frame,
                        () = sleep.as_mut() => break,
                    }
                }
            };
            match frame {
                None => {
                    let whole = taken.chunks.whole(taken.total);
                    self.outcome = Some(Ok(http::Response::from_parts(parts, ResponseBody::whole(whole))));
                    return Ok(());
                }
                Some(frame) => {
                    if let Some(data) = taken.count(frame)? {
                        taken.chunks.push(data);
                    }
                }
            }
        }
        // Still being written: stream it, starting with what was written so far.
        let queue = Arc::new(Queue::default());
        queue.state().chunks = std::mem::take(&mut taken.chunks);
        let streamed = ResponseBody(Inner::Stream { queue: queue.clone(), ended: false, _task: None });
        let Some(slot) = self.head.take() else { return Ok(()) };
        if Arc::strong_count(&slot) == 1 {
            // The caller has gone.
            return Ok(());
        }
        *slot.response.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(http::Response::from_parts(parts, streamed));
        slot.ready.notify_one();
        let feed = self.feed.insert(Feed(queue));
        while let Some(frame) = body.frame().await {
            if let Some(data) = taken.count(frame)?
                && !feed.push(data)
            {
                // The client has gone: nobody reads the rest.
                return Ok(());
            }
        }
        if let Some(feed) = self.feed.take() {
            feed.end(Ok(()));
        }
        Ok(())
    }
}

/// The body read so far, within the cap.
struct Taken {
    chunks: Chunks,
    total: usize,
    max: usize,
}

impl Taken {
    /// Counts a frame's data against the cap: its data, unless empty. Trailers are dropped (as
    /// when bodies were read whole).
    fn count<E>(&mut self, frame: Result<Frame<Bytes>, E>) -> Result<Option<Bytes>, HandleError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let frame =
            frame.map_err(|e| HandleError::GuestError(format!("response body failed: {}", e.into())))?;
        let Ok(data) = frame.into_data() else { return Ok(None) };
        self.total += data.len();
        if self.total > self.max {
            return Err(HandleError::ResponseBodyTooLarge { limit: self.max });
        }
        Ok((!data.is_empty()).then_some(data))
    }
}

/// A frame of `B`, or its error.
type FrameOf<B> = Result<Frame<<B as Body>::Data>, <B as Body>::Error>;

/// The body's next frame if it is ready now, without registering for a wake-up (the caller
/// polls again, registered, if it is not).
fn poll_now<B: Body>(body: Pin<&mut B>) -> Option<Option<FrameOf<B>>> {
    let mut cx = Context::from_waker(Waker::noop());
    match body.poll_frame(&mut cx) {
        Poll::Ready(frame) => Some(frame),
        Poll::Pending => None,
    }
}

/// Reads a body whole (what [`crate::App::handle`] answers).
pub(crate) async fn collect(body: ResponseBody) -> Result<Bytes, HandleError> {
    Ok(body.collect().await?.to_bytes())
}
