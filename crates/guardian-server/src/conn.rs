//! A TCP listener whose connections a handler can cut.
//!
//! The drop-connection faults need to close a connection without sending a
//! response, before or after the mutation commits. Each accepted stream
//! carries a [`KillSwitch`]; a handler reaches it through
//! `ConnectInfo<ConnInfo>` and flips it, after which every read and write
//! fails, so hyper abandons the connection and closes the socket: the client
//! sees the connection end with no response.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

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
    #[allow(dead_code)]
    pub(crate) remote: SocketAddr,
    kill: Arc<KillSwitch>,
}

impl ConnInfo {
    /// Makes the connection fail from now on: no response will be delivered.
    pub(crate) fn kill(&self) {
        self.kill.0.store(true, Ordering::SeqCst);
    }
}

impl Connected<IncomingStream<'_, KillableListener>> for ConnInfo {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A TCP listener producing [`KillableStream`]s.
#[derive(Debug)]
pub(crate) struct KillableListener(pub(crate) TcpListener);

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = ConnInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, remote) = Listener::accept(&mut self.0).await;
        // Small request/response pairs: don't wait for Nagle.
        let _ = stream.set_nodelay(true);
        let kill = Arc::new(KillSwitch::default());
        (
            KillableStream {
                inner: stream,
                kill: Arc::clone(&kill),
            },
            ConnInfo { remote, kill },
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(ConnInfo {
            remote: self.0.local_addr()?,
            kill: Arc::new(KillSwitch::default()),
        })
    }
}

/// A TCP stream that fails every operation once its switch is flipped.
#[derive(Debug)]
pub(crate) struct KillableStream {
    inner: TcpStream,
    kill: Arc<KillSwitch>,
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.kill.killed() {
            return Poll::Ready(Err(cut()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
