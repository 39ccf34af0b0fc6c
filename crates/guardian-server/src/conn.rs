//! Accepted connections: the caps on how many are open, and the switch a
//! handler uses to cut one.
//!
//! [`ConnLimits`] bounds the open connections in total and per peer address,
//! so that clients which connect and never finish a request cannot use up
//! the process's file descriptors (the header-read timeout, set where the
//! connections are served, closes them in time).
//!
//! The drop-connection faults need to close a connection without sending a
//! response, before or after the mutation commits. Each accepted stream
//! carries a [`KillSwitch`]; a handler reaches it through
//! `ConnectInfo<ConnInfo>` and flips it, after which every read and write
//! fails, so hyper abandons the connection and closes the socket: the client
//! sees the connection end with no response.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::proxy::TrustedProxies;

/// Caps on open connections, in total and per peer IP address; a trusted
/// proxy, which carries many clients' connections, has no per-peer cap.
#[derive(Debug)]
pub(crate) struct ConnLimits {
    total: Arc<Semaphore>,
    per_peer: usize,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    proxies: TrustedProxies,
}

/// One open connection's share of the caps, returned when dropped.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    _total: OwnedSemaphorePermit,
    peer: IpAddr,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

impl ConnLimits {
    pub(crate) fn new(total: usize, per_peer: usize, proxies: TrustedProxies) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            per_peer,
            peers: Arc::new(Mutex::new(HashMap::new())),
            proxies,
        }
    }

    /// Waits until the total cap allows one more connection. Taken before
    /// `accept`, so that connections beyond the cap wait in the kernel's
    /// backlog instead of holding a descriptor.
    pub(crate) async fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.total).acquire_owned().await.ok()
    }

    /// Admits a connection from `peer`, or `None` when that peer already
    /// has its share open.
    pub(crate) fn admit(&self, permit: OwnedSemaphorePermit, peer: IpAddr) -> Option<ConnSlot> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let n = peers.entry(peer).or_insert(0);
        if *n >= self.per_peer && !self.proxies.trusts(peer) {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            _total: permit,
            peer,
            peers: Arc::clone(&self.peers),
        })
    }
}

/// Cuts one connection.
#[derive(Debug, Default)]
pub(crate) struct KillSwitch(AtomicBool);

impl KillSwitch {
    fn killed(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Per-connection info handed to handlers.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) remote: SocketAddr,
    kill: Arc<KillSwitch>,
}

impl ConnInfo {
    /// Makes the connection fail from now on: no response will be delivered.
    pub(crate) fn kill(&self) {
        self.kill.0.store(true, Ordering::SeqCst);
    }
}

/// Wraps an accepted stream with a fresh kill switch.
/// The stream holds `slot`, so a connection counts against the caps until
/// its socket closes, also after an upgrade to WebSocket. A write that can
/// send nothing for `write_stall` fails: a peer that stopped reading would
/// otherwise hold its connection and the unsent answer for good.
pub(crate) fn killable(
    stream: TcpStream,
    remote: SocketAddr,
    slot: ConnSlot,
    write_stall: Duration,
) -> (KillableStream, ConnInfo) {
    // Small request/response pairs: don't wait for Nagle.
    let _ = stream.set_nodelay(true);
    let kill = Arc::new(KillSwitch::default());
    (
        KillableStream {
            inner: stream,
            kill: Arc::clone(&kill),
            _slot: slot,
            write_stall,
            stalled: None,
        },
        ConnInfo { remote, kill },
    )
}

/// A TCP stream that fails every operation once its switch is flipped, and
/// a write that stays blocked for its `write_stall`.
#[derive(Debug)]
pub(crate) struct KillableStream {
    inner: TcpStream,
    kill: Arc<KillSwitch>,
    _slot: ConnSlot,
    write_stall: Duration,
    /// Armed while a write waits for the peer to read.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl KillableStream {
    /// Passes a write's result on, or fails it once it has waited for the
    /// peer longer than `write_stall`.
    fn bounded<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.write_stall;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer stopped reading",
            )));
        }
        Poll::Pending
    }
}

fn cut() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection cut by fault injection",
    )
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.kill.killed() {
            return Poll::Ready(Err(cut()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.kill.killed() {
            return Poll::Ready(Err(cut()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.kill.killed() {
            return Poll::Ready(Err(cut()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.kill.killed() {
            return Poll::Ready(Err(cut()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
