//! What anti-entropy costs, over the real HTTP transport on loopback between two real stores:
//!
//! 1. one differing key among 1,000,000: bytes (bodies + headers, both ways) and round trips;
//! 2. a healed partition: 50,000 keys written at each side over a shared 100,000: time to
//!    converge, bytes and round trips.
//!
//! `cargo bench -p atoll-sync --bench reconcile` (`ATOLL_BENCH_KEYS` changes the 1,000,000).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use atoll_kv::{Clock, Entry, Hlc, Namespace, Stamp, Store, StoreConfig};
use atoll_sync::http::{Blobs, HttpTransport, Server};
use atoll_sync::message::PeerInfo;
use atoll_sync::{Node, NodeConfig};

struct NoBlobs;
impl Blobs for NoBlobs {
    fn blob(&self, _: &str) -> Option<Vec<u8>> {
        None
    }
}

const SECRET: &str = "bench-secret-0123456789";

struct Side {
    node: Arc<Node<Store>>,
    url: String,
    /// Bytes read and written by this side's server sockets: everything on the wire.
    wire: Arc<AtomicU64>,
    /// This side's client: one pooled connection per peer, as in a running site.
    transport: HttpTransport,
    _dir: tempfile::TempDir,
}

/// A listener whose connections count the bytes they carry.
struct Counting {
    inner: tokio::net::TcpListener,
    wire: Arc<AtomicU64>,
}

impl axum::serve::Listener for Counting {
    type Io = CountingStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok((stream, addr)) = self.inner.accept().await {
                // As a site's sockets are (listen.rs): no Nagle delay on small frames.
                let _ = stream.set_nodelay(true);
                return (CountingStream { inner: stream, wire: self.wire.clone() }, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

struct CountingStream {
    inner: tokio::net::TcpStream,
    wire: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.wire.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        poll
    }
}

impl tokio::io::AsyncWrite for CountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.wire.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn side(name: &str) -> Result<Side> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("kv.redb"), StoreConfig::new(name), Clock::system())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let me = PeerInfo { site: name.into(), region: "bench".into(), url: url.clone() };
    let node = Arc::new(
        Node::new(store, me, NodeConfig::default(), &[], atoll_sync::http::wall_ms()).expect("node"),
    );
    let server = Server {
        node: node.clone(),
        secret: atoll_sync::auth::Secret::new(SECRET)?,
        blobs: Arc::new(NoBlobs),
        replays: Default::default(),
    };
    let router = atoll_sync::http::routes(Arc::new(server));
    let wire = Arc::new(AtomicU64::new(0));
    let counted = Counting { inner: listener, wire: wire.clone() };
    tokio::spawn(async move { axum::serve(counted, router).await });
    let transport = HttpTransport::new(atoll_sync::auth::Secret::new(SECRET)?, Duration::from_secs(120));
    Ok(Side { node, url, wire, transport, _dir: dir })
}

/// Entries `from..to` as another site ("origin") wrote them: identical wherever merged.
fn entries(from: usize, to: usize, origin: &str) -> Vec<(Vec<u8>, Entry)> {
    let ns = Namespace::new("bench", "b", &atoll_kv::Bounds::default()).expect("ns");
    (from..to)
        .map(|i| {
            let stamp = Stamp { hlc: Hlc { physical_ms: 1_000 + i as u64, logical: 0 }, site: origin.into() };
            (ns.key(format!("key-{i:08}").as_bytes()), Entry::set(format!("value-{i}").into_bytes(), stamp))
        })
        .collect()
}

async fn fill(store: &Store, from: usize, to: usize, origin: &str) -> Result<()> {
    for start in (from..to).step_by(20_000) {
        store.merge(entries(start, (start + 20_000).min(to), origin)).await?;
    }
    Ok(())
}

fn payload(node: &Node<Store>) -> u64 {
    node.peers().iter().map(|p| p.payload_sent + p.payload_received).sum()
}

/// One session a → b: (round trips, payload bytes both ways, wire bytes both ways, time).
async fn session(a: &Side, b: &Side) -> Result<(usize, u64, u64, Duration)> {
    let transport = &a.transport;
    a.node.add_peer(&b.url, atoll_sync::http::wall_ms());
    let (payload_before, wire_before) = (payload(&a.node), b.wire.load(Ordering::Relaxed));
    let started = Instant::now();
    let rounds = a.node.anti_entropy(transport, &b.url, 42, atoll_sync::http::wall_ms()).await?;
    let took = started.elapsed();
    Ok((rounds, payload(&a.node) - payload_before, b.wire.load(Ordering::Relaxed) - wire_before, took))
}

fn same(a: &Side, b: &Side) -> Result<bool> {
    Ok(a.node.store().digests()? == b.node.store().digests()?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let n: usize = std::env::var("ATOLL_BENCH_KEYS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);

    let (a, b) = (side("a").await?, side("b").await?);
    let t = Instant::now();
    fill(a.node.store(), 0, n, "origin").await?;
    fill(b.node.store(), 0, n, "origin").await?;
    eprintln!("filled two stores with {n} keys each in {:.1?}", t.elapsed());
    // Open the connection, as a running site has it open: the measured sessions reuse it.
    session(&a, &b).await?;
    // One key differs: written at a only.
    fill(a.node.store(), n, n + 1, "a").await?;
    let (rounds, payload, wire, took) = session(&a, &b).await?;
    assert!(same(&a, &b)?, "converged");
    println!(
        "1 differing key among {n} (held by the initiator): {payload} bytes of messages, {wire} bytes on the wire \
         with HTTP/2 framing (both ways), {rounds} round trips, {took:.1?}"
    );
    // The same difference, the other way (b holds the key a lacks).
    fill(b.node.store(), n + 1, n + 2, "b").await?;
    let (rounds, payload, wire, took) = session(&a, &b).await?;
    assert!(same(&a, &b)?, "converged");
    println!(
        "1 differing key among {n} (held by the responder): {payload} bytes of messages, {wire} on the wire, \
         {rounds} round trips, {took:.1?}"
    );
    let (rounds, payload, wire, took) = session(&a, &b).await?;
    println!(
        "no difference: {payload} bytes of messages, {wire} on the wire, {rounds} round trip, {took:.1?}"
    );

    let (c, d) = (side("c").await?, side("d").await?);
    fill(c.node.store(), 0, 100_000, "origin").await?;
    fill(d.node.store(), 0, 100_000, "origin").await?;
    session(&c, &d).await?;
    fill(c.node.store(), 100_000, 150_000, "c").await?;
    fill(d.node.store(), 150_000, 200_000, "d").await?;
    let (rounds, payload, wire, took) = session(&c, &d).await?;
    assert!(same(&c, &d)?, "converged");
    println!(
        "partition healed, 100000 differing keys (50000 each side) over 100000 shared: converged in {took:.2?}, \
         {:.2} MiB of messages, {:.2} MiB on the wire, {rounds} round trips",
        payload as f64 / (1 << 20) as f64,
        wire as f64 / (1 << 20) as f64
    );
    Ok(())
}
