//! The guest's stdout and stderr, turned into `tracing` events tagged with app and request id.
//!
//! Output is split into lines; a line longer than [`MAX_LINE`] is emitted in pieces. Nothing is
//! buffered beyond one line, so a chatty guest costs log volume, not host memory.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// The longest line emitted as one event.
pub(crate) const MAX_LINE: usize = 4096;

/// Which stream a [`GuestLog`] stands for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// One of a request's output streams. Clones share the line buffer.
#[derive(Clone)]
pub(crate) struct GuestLog {
    inner: Arc<Inner>,
    stream: Stream,
}

/// What a request's two streams share (one allocation for both).
struct Inner {
    app: Arc<str>,
    request_id: Arc<str>,
    /// The unfinished line of stdout and of stderr.
    lines: [Mutex<Vec<u8>>; 2],
}

impl GuestLog {
    /// A request's stdout and stderr.
    pub(crate) fn pair(app: Arc<str>, request_id: Arc<str>) -> (GuestLog, GuestLog) {
        let inner = Arc::new(Inner { app, request_id, lines: Default::default() });
        (
            GuestLog { inner: inner.clone(), stream: Stream::Stdout },
            GuestLog { inner, stream: Stream::Stderr },
        )
    }

    fn write_bytes(&self, mut bytes: &[u8]) {
        let mut line = self.inner.lines[self.stream as usize].lock().unwrap_or_else(|e| e.into_inner());
        while !bytes.is_empty() {
            let room = MAX_LINE - line.len();
            let (chunk, newline) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) if i <= room => (&bytes[..i], true),
                _ => (&bytes[..bytes.len().min(room)], false),
            };
            line.extend_from_slice(chunk);
            bytes = &bytes[chunk.len() + usize::from(newline)..];
            if newline || line.len() == MAX_LINE {
                self.inner.emit(self.stream, &line);
                line.clear();
            }
        }
    }
}

impl Inner {
    fn emit(&self, stream: Stream, line: &[u8]) {
        // The text is only decoded when the event is enabled: the macros evaluate their
        // arguments lazily.
        let (app, request_id) = (&*self.app, &*self.request_id);
        match stream {
            Stream::Stdout => {
                tracing::info!(target: "atoll::guest", app, request_id, stream = "stdout", "{}", String::from_utf8_lossy(line))
            }
            Stream::Stderr => {
                tracing::warn!(target: "atoll::guest", app, request_id, stream = "stderr", "{}", String::from_utf8_lossy(line))
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let line =
                std::mem::take(self.lines[stream as usize].get_mut().unwrap_or_else(|e| e.into_inner()));
            if !line.is_empty() {
                self.emit(stream, &line);
            }
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for GuestLog {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestLog {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestLog {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
