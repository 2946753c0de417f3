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
//! cap, the memory a whole body takes anyway), so a client reading slowly holds bytes, not an
//! instance, as when bodies were always read whole.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};

use crate::HandleError;

/// How long after its head a response's body may go on before it is streamed.
pub const STREAM_AFTER: Duration = Duration::from_millis(100);

/// What a streamed body's channel carries: data, then an end or an error.
enum Event {
    Data(Bytes),
    End,
    Failed(HandleError),
}

/// The body of a response served by [`crate::App::serve`]: the whole body, or a stream of it.
pub struct ResponseBody(Inner);

enum Inner {
    Whole(Option<Bytes>),
    Stream {
        events: mpsc::UnboundedReceiver<Event>,
        ended: bool,
        /// The guest's task: aborted if the body is dropped before it ends (a client gone).
        _task: Option<crate::app::Abortable<()>>,
    },
}

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

    /// Whether the body is streamed (its end and any failure are still to come).
    pub fn is_streamed(&self) -> bool {
        matches!(self.0, Inner::Stream { .. })
    }

    /// Ties the guest's task to a streamed body, so that dropping the body ends the guest.
    pub(crate) fn hold(&mut self, task: crate::app::Abortable<()>) -> Option<crate::app::Abortable<()>> {
        match &mut self.0 {
            Inner::Stream { _task, .. } => {
                *_task = Some(task);
                None
            }
            Inner::Whole(_) => Some(task),
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
        match &mut self.0 {
            Inner::Whole(bytes) => {
                Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
            Inner::Stream { events, ended, .. } => {
                if *ended {
                    return Poll::Ready(None);
                }
                match events.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Event::Data(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Poll::Ready(Some(Event::End)) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Event::Failed(e))) => {
                        *ended = true;
                        Poll::Ready(Some(Err(e)))
                    }
                    // The guest's task went without saying how the body ended: never a
                    // complete body.
                    Poll::Ready(None) => {
                        *ended = true;
                        let e = HandleError::Internal("the response body ended unexpectedly".into());
                        Poll::Ready(Some(Err(e)))
                    }
                }
            }
        }
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

/// Where a request's response goes: its head once (with the whole body, or the start of a
/// stream), then, if streamed, the rest of the body and how it ended.
pub(crate) struct Reply {
    head: Option<oneshot::Sender<Result<http::Response<ResponseBody>, HandleError>>>,
    stream: Option<mpsc::UnboundedSender<Event>>,
    app: std::sync::Arc<str>,
    request_id: std::sync::Arc<str>,
}

/// The receiving end of a [`Reply`].
pub(crate) type Head = oneshot::Receiver<Result<http::Response<ResponseBody>, HandleError>>;

impl Reply {
    pub(crate) fn new(app: std::sync::Arc<str>, request_id: std::sync::Arc<str>) -> (Reply, Head) {
        let (tx, rx) = oneshot::channel();
        (Reply { head: Some(tx), stream: None, app, request_id }, rx)
    }

    /// Ends the response with `error`: its status if the head is not sent yet, else the
    /// streamed body cut short.
    pub(crate) fn fail(&mut self, error: HandleError) {
        if let Some(head) = self.head.take() {
            let _ = head.send(Err(error));
        } else if let Some(stream) = self.stream.take() {
            tracing::warn!(app = %self.app, request_id = %self.request_id, "streamed response cut short: {error}");
            metrics::counter!("atoll_responses_cut_total", "app" => self.app.to_string()).increment(1);
            let _ = stream.send(Event::Failed(error));
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
        let mut taken = Taken { chunks: Vec::new(), total: 0, max: max_body };
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
                    let whole = taken.whole();
                    if let Some(head) = self.head.take() {
                        let _ = head.send(Ok(http::Response::from_parts(parts, ResponseBody::whole(whole))));
                    }
                    return Ok(());
                }
                Some(frame) => taken.add(frame)?,
            }
        }
        // Still being written: stream it.
        let (tx, rx) = mpsc::unbounded_channel();
        for chunk in taken.chunks.drain(..) {
            let _ = tx.send(Event::Data(chunk));
        }
        let streamed = ResponseBody(Inner::Stream { events: rx, ended: false, _task: None });
        if let Some(head) = self.head.take()
            && head.send(Ok(http::Response::from_parts(parts, streamed))).is_err()
        {
            return Ok(());
        }
        let tx = self.stream.insert(tx);
        while let Some(frame) = body.frame().await {
            let Some(data) = taken.count(frame)? else { continue };
            if tx.send(Event::Data(data)).is_err() {
                // The client has gone: nobody reads the rest.
                return Ok(());
            }
        }
        if let Some(tx) = self.stream.take() {
            let _ = tx.send(Event::End);
        }
        Ok(())
    }
}

/// The body read so far, within the cap.
struct Taken {
    chunks: Vec<Bytes>,
    total: usize,
    max: usize,
}

impl Taken {
    /// Counts a frame's data against the cap; trailers are dropped (as when bodies were read
    /// whole).
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
        Ok(Some(data))
    }

    fn add<E>(&mut self, frame: Result<Frame<Bytes>, E>) -> Result<(), HandleError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(data) = self.count(frame)?
            && !data.is_empty()
        {
            self.chunks.push(data);
        }
        Ok(())
    }

    /// The chunks as one buffer (without a copy when there is one chunk).
    fn whole(&mut self) -> Bytes {
        match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut all = Vec::with_capacity(self.total);
                for chunk in self.chunks.drain(..) {
                    all.extend_from_slice(&chunk);
                }
                Bytes::from(all)
            }
        }
    }
}

/// A frame of `B`, or its error.
type FrameOf<B> = Result<Frame<<B as Body>::Data>, <B as Body>::Error>;

/// The body's next frame if it is ready now, without registering for a wake-up (the caller
/// polls again, registered, if it is not).
fn poll_now<B: Body>(body: Pin<&mut B>) -> Option<Option<FrameOf<B>>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match body.poll_frame(&mut cx) {
        Poll::Ready(frame) => Some(frame),
        Poll::Pending => None,
    }
}

/// Reads a body whole (what [`crate::App::handle`] answers).
pub(crate) async fn collect(body: ResponseBody) -> Result<Bytes, HandleError> {
    Ok(body.collect().await?.to_bytes())
}
