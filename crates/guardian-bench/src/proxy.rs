//! A loopback TCP proxy that counts what passes through it and can stand in
//! for a slow link.
//!
//! Placed between a client and the reference server, it measures bytes sent
//! each way and connections opened without touching either side's code, and
//! records when the first byte of the first request arrived (the end of the
//! "process start to first request" measurement).
//!
//! [`CountingProxy::with_latency`] also delays every chunk by a fixed one-way
//! delay in each direction, like a wide-area link: a chunk read at `t` is
//! written at `t + delay`, in order, by a forwarding task per direction fed
//! through a channel of timestamped chunks. Delays overlap (a chunk waits only
//! for its own due time, never behind another chunk's sleep), so the link
//! adds latency without limiting throughput. A new connection's first bytes
//! also wait one extra round trip, as a TCP handshake would make them.
//!
//! [`CountingProxy::with_link`] adds a bandwidth cap in each direction: a
//! token bucket with no burst allowance, shared by every connection through
//! the proxy (they share the device's one link). A chunk leaves once the
//! bytes queued before it in its direction have left, and takes its size
//! over the rate to transmit; its delay starts when its last byte has left.
//! There is no loss or reordering, and the rate applies to the bytes the
//! proxy forwards (TCP/IP headers are not simulated).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks in flight per direction of a delayed connection before the reader
/// waits for the link to drain (64 KiB each at most).
const CHUNKS_IN_FLIGHT: usize = 1024;

/// Largest chunk read at once on a rate-limited link: a chunk is forwarded
/// whole once its last byte has left, so smaller chunks keep that
/// store-and-forward delay short next to a round trip.
const PACED_CHUNK: usize = 8 * 1024;

/// A simulated link: a fixed one-way delay each way and, optionally, a rate
/// cap in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Link {
    /// Added to every chunk in each direction (a round trip is twice this).
    pub one_way: Duration,
    /// Bits per second each way; `None` for no cap.
    pub bits_per_sec: Option<u64>,
}

impl Link {
    /// Seconds the link needs to carry `bytes` in one direction at its rate
    /// (zero without a cap).
    pub fn transmit_secs(&self, bytes: u64) -> f64 {
        // Byte counts and rates are far below 2^52.
        #[allow(clippy::cast_precision_loss)]
        self.bits_per_sec
            .filter(|&b| b > 0)
            .map_or(0.0, |b| bytes as f64 * 8.0 / b as f64)
    }
}

/// One direction's token bucket (no burst): when the link is next free.
#[derive(Debug)]
struct Pacer {
    bits_per_sec: u64,
    free_at: Mutex<Option<tokio::time::Instant>>,
}

impl Pacer {
    /// Queues `bytes` that became ready at `ready`; returns when their last
    /// byte has left.
    fn transmit(&self, ready: tokio::time::Instant, bytes: usize) -> tokio::time::Instant {
        let mut free_at = self.free_at.lock().unwrap_or_else(PoisonError::into_inner);
        let start = free_at.map_or(ready, |f| f.max(ready));
        let nanos = (bytes as u128 * 8 * 1_000_000_000) / u128::from(self.bits_per_sec.max(1));
        let done = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        *free_at = Some(done);
        done
    }
}

#[derive(Debug, Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
    first_byte: Mutex<Option<Instant>>,
    /// Rate caps (up, down), shared by all connections.
    pacers: Option<(Pacer, Pacer)>,
}

/// A running counting proxy; stops accepting when dropped.
#[derive(Debug)]
pub struct CountingProxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
    link: Link,
}

/// Counts read from a [`CountingProxy`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes from clients to the upstream (requests: headers and bodies).
    pub bytes_up: u64,
    /// Bytes from the upstream back to clients.
    pub bytes_down: u64,
    /// TCP connections accepted.
    pub connections: u64,
}

impl CountingProxy {
    /// Listens on an ephemeral loopback port and forwards every connection
    /// to `upstream` as fast as loopback allows. Must be called inside a
    /// tokio runtime.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        Self::with_latency(upstream, Duration::ZERO).await
    }

    /// Like [`CountingProxy::start`], but every chunk is delayed by
    /// `one_way` in each direction (a round trip of twice that), and a new
    /// connection's first bytes wait one more round trip (the handshake).
    /// A zero delay forwards directly. Must be called inside a tokio
    /// runtime; connections are served on that runtime.
    pub async fn with_latency(upstream: SocketAddr, one_way: Duration) -> std::io::Result<Self> {
        Self::with_link(
            upstream,
            Link {
                one_way,
                bits_per_sec: None,
            },
        )
        .await
    }

    /// Like [`CountingProxy::with_latency`], with `link`'s rate cap besides
    /// (shared by all connections, each direction on its own). Must be
    /// called inside a tokio runtime; connections are served on that
    /// runtime.
    pub async fn with_link(upstream: SocketAddr, link: Link) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let pacer = |bits_per_sec| Pacer {
            bits_per_sec,
            free_at: Mutex::new(None),
        };
        let counters = Arc::new(Counters {
            pacers: link
                .bits_per_sec
                .filter(|&b| b > 0)
                .map(|b| (pacer(b), pacer(b))),
            ..Counters::default()
        });
        let one_way = link.one_way;
        let direct = one_way.is_zero() && counters.pacers.is_none();
        let c = counters.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let accepted = tokio::time::Instant::now();
                c.connections.fetch_add(1, Ordering::Relaxed);
                let c = c.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        if direct {
                            pump_pair(client, server, &c).await;
                        } else {
                            delay_pair(client, server, c, one_way, accepted).await;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            counters,
            accept,
            link,
        })
    }

    /// The one-way delay added in each direction (zero for a plain proxy).
    pub fn one_way(&self) -> Duration {
        self.link.one_way
    }

    /// The simulated link (no delay and no cap for a plain proxy).
    pub fn link(&self) -> Link {
        self.link
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for HTTP clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Traffic so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            bytes_up: self.counters.up.load(Ordering::Relaxed),
            bytes_down: self.counters.down.load(Ordering::Relaxed),
            connections: self.counters.connections.load(Ordering::Relaxed),
        }
    }

    /// When the first byte from any client arrived, if one has.
    pub fn first_byte_at(&self) -> Option<Instant> {
        *self
            .counters
            .first_byte
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Zeroes the counters and forgets the first byte (between measurements).
    pub fn reset(&self) {
        self.counters.up.store(0, Ordering::Relaxed);
        self.counters.down.store(0, Ordering::Relaxed);
        self.counters.connections.store(0, Ordering::Relaxed);
        *self
            .counters
            .first_byte
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pump_pair(client: TcpStream, server: TcpStream, c: &Counters) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            note_first_byte(c);
            c.up.fetch_add(n as u64, Ordering::Relaxed);
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            c.down.fetch_add(n as u64, Ordering::Relaxed);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

fn note_first_byte(c: &Counters) {
    let mut first = c.first_byte.lock().unwrap_or_else(PoisonError::into_inner);
    if first.is_none() {
        *first = Some(Instant::now());
    }
}

/// A chunk on the simulated link: when it may be written, and its bytes
/// (`None`: the sender closed its side, to be passed on at that time).
type Timed = (tokio::time::Instant, Option<Vec<u8>>);

/// Forwards both directions of a connection through the delayed link.
async fn delay_pair(
    client: TcpStream,
    server: TcpStream,
    c: Arc<Counters>,
    one_way: Duration,
    accepted: tokio::time::Instant,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // The client believes it is connected at once, but on a real link its
    // first bytes could leave only after the SYN / SYN-ACK round trip.
    let handshake_done = accepted + one_way * 2;
    let up = delay_direction(cr, sw, c.clone(), one_way, Some(handshake_done), true);
    let down = delay_direction(sr, cw, c, one_way, None, false);
    tokio::join!(up, down);
}

/// One direction of the delayed link: this task reads and timestamps chunks
/// as they arrive; a forwarding task writes each at its due time, in order.
async fn delay_direction<R, W>(
    mut reader: R,
    writer: W,
    c: Arc<Counters>,
    one_way: Duration,
    not_before: Option<tokio::time::Instant>,
    upward: bool,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Timed>(CHUNKS_IN_FLIGHT);
    let forward = tokio::spawn(forward_timed(rx, writer));
    let ready = || {
        let now = tokio::time::Instant::now();
        not_before.map_or(now, |t| t.max(now))
    };
    let pacer = c
        .pacers
        .as_ref()
        .map(|(up, down)| if upward { up } else { down });
    let mut buf = vec![
        0u8;
        if pacer.is_some() {
            PACED_CHUNK
        } else {
            64 * 1024
        }
    ];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if upward {
            note_first_byte(&c);
            c.up.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            c.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        let left = pacer.map_or_else(ready, |p| p.transmit(ready(), n));
        if tx
            .send((left + one_way, Some(buf[..n].to_vec())))
            .await
            .is_err()
        {
            // The far side is gone; stop reading.
            break;
        }
    }
    // The close follows the last chunk (which may still be on the link).
    let last = pacer.map_or_else(ready, |p| p.transmit(ready(), 0));
    let _ = tx.send((last + one_way, None)).await;
    drop(tx);
    let _ = forward.await;
}

/// Writes each chunk once it is due. Chunks arrive in read order with
/// nondecreasing due times, so sleeping until each one's due time in turn
/// delays every chunk by the same amount without adding delays up.
async fn forward_timed<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Timed>, mut writer: W) {
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        match chunk {
            Some(bytes) => {
                if writer.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            None => break,
        }
    }
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_and_counts() {
        // An echo server as the upstream.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"pong!!").await.unwrap();
        });
        let proxy = CountingProxy::start(up_addr).await.unwrap();
        assert!(proxy.first_byte_at().is_none());
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"ping!").await.unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong!!");
        let t = proxy.traffic();
        assert_eq!((t.bytes_up, t.bytes_down, t.connections), (5, 6, 1));
        assert!(proxy.first_byte_at().is_some());
        assert!(proxy.url().starts_with("http://127.0.0.1:"));
        proxy.reset();
        assert_eq!(proxy.traffic(), Traffic::default());
        assert!(proxy.first_byte_at().is_none());
    }

    /// Delays are lower bounds only (never an upper bound on wall-clock time).
    #[tokio::test]
    async fn delays_each_direction_and_keeps_order() {
        const ONE_WAY: Duration = Duration::from_millis(20);
        // An echo server as the upstream.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = upstream.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let proxy = CountingProxy::with_latency(up_addr, ONE_WAY).await.unwrap();
        assert_eq!(proxy.one_way(), ONE_WAY);
        let started = Instant::now();
        let c = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = c.into_split();
        // First exchange: handshake round trip, then one round trip.
        w.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(started.elapsed() >= ONE_WAY * 4, "{:?}", started.elapsed());
        // Later exchanges: one round trip each.
        let sent = Instant::now();
        w.write_all(b"again").await.unwrap();
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"again");
        assert!(sent.elapsed() >= ONE_WAY * 2, "{:?}", sent.elapsed());
        // Many writes arrive whole and in order; the close is passed on.
        let expected: Vec<u8> = (0..2_000u32).flat_map(u32::to_be_bytes).collect();
        let writer = tokio::spawn(async move {
            for chunk in (0..2_000u32).collect::<Vec<_>>().chunks(50) {
                let bytes: Vec<u8> = chunk.iter().copied().flat_map(u32::to_be_bytes).collect();
                w.write_all(&bytes).await.unwrap();
                tokio::task::yield_now().await;
            }
            w.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        r.read_to_end(&mut echoed).await.unwrap();
        writer.await.unwrap();
        assert_eq!(echoed, expected);
        let t = proxy.traffic();
        assert_eq!(t.bytes_up, 10 + expected.len() as u64);
        assert_eq!(t.bytes_down, t.bytes_up);
        assert_eq!(t.connections, 1);
    }

    /// The rate cap is shared by connections and is a lower bound on time
    /// (never an upper bound).
    #[tokio::test]
    async fn caps_the_rate_across_connections() {
        const BITS: u64 = 2_000_000;
        const EACH: usize = 25_000;
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
        });
        let link = Link {
            one_way: Duration::from_millis(1),
            bits_per_sec: Some(BITS),
        };
        let proxy = CountingProxy::with_link(up_addr, link).await.unwrap();
        assert_eq!(proxy.link(), link);
        let addr = proxy.addr();
        let a: Vec<u8> = (0..EACH).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = a.iter().rev().copied().collect();
        let started = Instant::now();
        tokio::join!(echo_through(addr, a), echo_through(addr, b));
        let floor = link.transmit_secs((2 * EACH) as u64);
        assert!(
            started.elapsed().as_secs_f64() >= floor,
            "{:?} < {floor} s",
            started.elapsed()
        );
        let t = proxy.traffic();
        assert_eq!(
            (t.bytes_up, t.bytes_down),
            ((2 * EACH) as u64, (2 * EACH) as u64)
        );
        assert_eq!(t.connections, 2);
    }

    /// Sends `payload` through `addr` and checks it comes back whole.
    async fn echo_through(addr: SocketAddr, payload: Vec<u8>) {
        let c = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = c.into_split();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        r.read_to_end(&mut echoed).await.unwrap();
        writer.await.unwrap();
        assert_eq!(echoed, expected);
    }

    #[test]
    fn transmit_time_follows_the_rate() {
        let link = Link {
            one_way: Duration::ZERO,
            bits_per_sec: Some(10_000_000),
        };
        assert!((link.transmit_secs(1_250_000) - 1.0).abs() < 1e-9);
        assert!(Link::default().transmit_secs(1_000_000).abs() < f64::EPSILON);
    }
}
