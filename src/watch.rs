//! Sees HTTP/1 clients leave while hyper is not reading their connection: an unread request
//! body, `Expect: 100-continue`, a pipelined request waiting, an idle stream.
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # mod example {
//! use axum::{routing::post, Router};
//! use tower_timeouts::{watch::WatchedListener, ClientDisconnectLayer};
//!
//! # async fn run() -> std::io::Result<()> {
//! let app = Router::new()
//!     .route("/upload", post(|| async { "the body was never read" }))
//!     .layer(ClientDisconnectLayer::new());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! // Every accepted connection is watched: a client that leaves is seen at once.
//! axum::serve(WatchedListener::new(listener), app).await
//! # }
//! # }
//! ```
//!
//! # Why
//!
//! The only sign a service gets that its client left is that hyper drops its response future
//! (see [`client_disconnect`](crate::client_disconnect)). Over HTTP/1, hyper reads the
//! connection, and so sees a client's FIN or RST, only while it wants more of the request:
//! once the handler has read the body, or when there is none. While a handler holds a body
//! unread (it validates, queries or waits first; a slow or stalled upload; `Expect:
//! 100-continue`; a chunked body), or a pipelined request waits in hyper's buffer, hyper does
//! not look, and the handler runs to its end for a client long gone (hyper#1716). The same holds
//! for a streamed response whose request was not read to its end.
//!
//! # How
//!
//! [`Watched`] wraps an accepted stream, below hyper (and below TLS). It registers a duplicate of
//! the socket with tokio's reactor for read readiness, which notices the peer's FIN
//! (`EPOLLRDHUP`) or RST (`EPOLLHUP`) without reading a byte. Bytes waiting to be read, such as
//! an unread body or a pipelined request, are not a close. When hyper is not reading the
//! connection itself and the peer has closed, the stream's next flush fails with
//! [`ClientLeft`], which hyper calls on every turn of its connection: hyper closes the
//! connection and drops the request's future or body, exactly as it does for a departure it
//! sees itself. So everything downstream is unchanged: [`ClientDisconnectLayer`] records a 499
//! (or, during the body, the status sent), fires [`ClientGone`](crate::ClientGone), and the
//! handler is dropped, with no layer or handler of yours knowing about the watcher.
//!
//! While hyper waits to read the connection itself (between requests, or while the handler
//! reads the body), the watcher stands aside. A close that hyper reads between requests, right
//! after an answer, is hyper's to end the connection cleanly; one it reads while a request is in
//! flight is still a departure, since hyper then only notes it and waits on for the handler.
//!
//! [`ClientDisconnectLayer`]: crate::ClientDisconnectLayer
//!
//! # A client that half-closes
//!
//! A client may shut down its writing side (`shutdown(SHUT_WR)`) and still read the response.
//! By default that FIN counts as leaving, as it does for nginx (which logs a 499) and for
//! hyper's default `half_close(false)`. With [`Watched::half_close`] (or
//! [`WatchedListener::half_close`]), only a reset counts; a client that half-closed and then
//! goes away is seen at the next write, as with hyper's `half_close(true)`. A server that sets
//! hyper's `half_close(true)` sets this too.
//!
//! # Using it
//!
//! - `axum::serve`: [`WatchedListener`] (with the `axum` feature) wraps any
//!   [`axum::serve::Listener`] whose streams are sockets (`TcpListener`, `UnixListener`, or one
//!   tapped with `ListenerExt::tap_io` for `TCP_NODELAY`). For the client's address, serve
//!   `app.into_make_service_with_connect_info::<PeerAddr>()` and extract `ConnectInfo<PeerAddr>`:
//!   axum implements `ConnectInfo<SocketAddr>` for its own listeners only.
//! - hyper-util's `server::conn::auto::Builder` (or hyper's own connections):
//!   `TokioIo::new(Watched::new(stream))` in the accept loop.
//! - TLS: watch the TCP stream, then hand it to the TLS acceptor:
//!   `acceptor.accept(Watched::new(stream))`. The TLS layer's flush reaches the watcher.
//!
//! HTTP/2 needs none of this (its connection is always read), and is unaffected by it.
//!
//! # What it costs
//!
//! One more file descriptor per connection (the duplicate) and its registration with the
//! reactor, made when the stream is wrapped; no task. Each flush while hyper is not reading
//! checks the duplicate's readiness: an atomic load, and storing the connection task's waker
//! when nothing is pending. If the duplicate cannot be made (out of file descriptors), the
//! stream is served unwatched, and a WARN event says so. See the README's figures.
//!
//! Unix only (it needs the socket's file descriptor).

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// An accepted stream, watched for a client that leaves while hyper is not reading it.
///
/// See the [module docs](self). Reads, writes and shutdown go straight to the inner stream;
/// once the peer is seen leaving, flushes and writes fail with [`ClientLeft`].
///
/// ```no_run
/// use hyper_util::rt::{TokioExecutor, TokioIo};
/// use hyper_util::server::conn::auto::Builder;
/// use hyper_util::service::TowerToHyperService;
/// use tower_timeouts::{watch::Watched, ClientDisconnectLayer};
///
/// # async fn run(app: axum::Router) -> std::io::Result<()> {
/// let app = app.layer(ClientDisconnectLayer::new());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// loop {
///     let (stream, _) = listener.accept().await?;
///     stream.set_nodelay(true)?;
///     let service = TowerToHyperService::new(app.clone());
///     tokio::spawn(async move {
///         let io = TokioIo::new(Watched::new(stream));
///         let _ = Builder::new(TokioExecutor::new()).serve_connection(io, service).await;
///     });
/// }
/// # }
/// ```
pub struct Watched<IO> {
    io: IO,
    // A duplicate of the socket, registered with the reactor; `None` when it could not be
    // made, or once there is nothing more to watch for. Only its readiness is used, which is
    // the same for any stream socket: a Unix stream is registered as a `TcpStream` too.
    watch: Option<TcpStream>,
    half_close: bool,
    // A read since the last flush was pending: whoever reads the stream (hyper) waits on it,
    // and will see a close itself. hyper reads, if it wants to, before it flushes on every turn
    // of its connection.
    read_waits: bool,
    // Something was written since the last bytes were read: an answer went out after the last
    // request.
    wrote: bool,
    // The reader saw the stream end (or fail) right after an answer, a close between requests:
    // it ends the connection itself. An end seen while a request is in flight (its bytes the
    // last thing read) is not enough: hyper, reading a body the handler has not asked for, or
    // looking for a close, notes it and waits on for the handler.
    reader_ends: bool,
    // The peer was seen leaving.
    left: bool,
}

impl<IO: AsFd> Watched<IO> {
    /// Watches `io`, an accepted socket (a TCP or Unix stream).
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime with IO enabled, as `TcpStream::from_std` does.
    pub fn new(io: IO) -> Self {
        let watch = io
            .as_fd()
            .try_clone_to_owned()
            .and_then(|fd| TcpStream::from_std(std::net::TcpStream::from(fd)));
        let watch = match watch {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::warn!(%error, "tower-timeouts: a connection is served unwatched");
                None
            }
        };
        Watched {
            io,
            watch,
            half_close: false,
            read_waits: false,
            wrote: false,
            reader_ends: false,
            left: false,
        }
    }
}

impl<IO> Watched<IO> {
    /// Whether a client's FIN alone (`shutdown(SHUT_WR)`, still reading) is *not* taken for
    /// leaving: only a reset is. Off by default; see the [module docs](self#a-client-that-half-closes).
    pub fn half_close(mut self, allow: bool) -> Self {
        self.half_close = allow;
        self
    }

    /// Whether the peer was seen leaving.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The inner stream, mutably.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Whether the peer has left, checked only when no reader of the stream waited on it since
    /// the last check; when it has not, the task is woken when that may change.
    fn poll_left(&mut self, cx: &mut Context<'_>) -> bool {
        if self.left {
            return true;
        }
        if std::mem::take(&mut self.read_waits) || self.reader_ends {
            return false;
        }
        let Some(watch) = &self.watch else {
            return false;
        };
        loop {
            // Registers the task's waker when nothing is pending; the readiness itself (a
            // close among it) from a `ready` future, which returns it at once when there is some.
            let ready = match watch.poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Ok(())) => std::pin::pin!(watch.ready(Interest::READABLE)).poll(cx),
                Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            };
            let ready = match ready {
                Poll::Ready(Ok(ready)) => ready,
                // Cleared in between: `poll_read_ready` registers the waker this time.
                Poll::Pending => continue,
                // The reactor is gone (the runtime shuts down): nothing more to watch for.
                Poll::Ready(Err(_)) => {
                    self.watch = None;
                    return false;
                }
            };
            if ready.is_read_closed() {
                // A FIN, or a reset; with half-closes allowed, only a reset is leaving.
                let reset = || {
                    matches!(
                        socket2::SockRef::from(watch).take_error(),
                        Ok(Some(_)) | Err(_)
                    )
                };
                if !self.half_close || reset() {
                    self.left = true;
                    return true;
                }
                // Half-closed: the closed state stays set, so there is nothing more to wait
                // for; a reset after it is seen at the next write.
                self.watch = None;
                return false;
            }
            // Bytes waiting to be read: not a close. Forget them, and wait for the next change.
            let _ = watch.try_io(Interest::READABLE, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
        }
    }
}

impl<IO> fmt::Debug for Watched<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("watching", &self.watch.is_some())
            .field("half_close", &self.half_close)
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (before, room) = (buf.filled().len(), buf.remaining());
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        match &polled {
            Poll::Pending => this.read_waits = true,
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.read_waits = false;
                this.wrote = false;
            }
            Poll::Ready(Ok(())) if room == 0 => {}
            // The end of the stream, or an error (a reset).
            Poll::Ready(_) => this.reader_ends |= this.wrote,
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.left {
            return Poll::Ready(Err(ClientLeft::error()));
        }
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote |= matches!(written, Poll::Ready(Ok(1..)));
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.left {
            return Poll::Ready(Err(ClientLeft::error()));
        }
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote |= matches!(written, Poll::Ready(Ok(1..)));
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// Fails with [`ClientLeft`] once the peer is seen leaving; checks for that first while
    /// the stream is not being read.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_left(cx) {
            return Poll::Ready(Err(ClientLeft::error()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The error a [`Watched`] stream's flushes and writes fail with once its peer is seen
/// leaving, inside an [`io::Error`] of kind `ConnectionAborted`. hyper closes the connection
/// on it; a server loop that logs connection errors can tell it apart with
/// `error.get_ref().is_some_and(|e| e.is::<ClientLeft>())` (walking `source()` from hyper's
/// error).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientLeft;

impl ClientLeft {
    fn error() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, ClientLeft)
    }
}

impl fmt::Display for ClientLeft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the client closed its connection")
    }
}

impl std::error::Error for ClientLeft {}

#[cfg(feature = "axum")]
pub use self::listener::{PeerAddr, WatchedListener};

#[cfg(feature = "axum")]
mod listener {
    use std::os::fd::AsFd;

    use super::Watched;

    /// An [`axum::serve::Listener`] whose connections are [`Watched`].
    ///
    /// See the [module docs](super) for an example.
    #[derive(Debug)]
    pub struct WatchedListener<L> {
        inner: L,
        half_close: bool,
    }

    impl<L> WatchedListener<L> {
        /// Watches every connection `inner` accepts.
        pub fn new(inner: L) -> Self {
            WatchedListener {
                inner,
                half_close: false,
            }
        }

        /// [`Watched::half_close`] for every connection.
        pub fn half_close(mut self, allow: bool) -> Self {
            self.half_close = allow;
            self
        }

        /// The inner listener.
        pub fn get_ref(&self) -> &L {
            &self.inner
        }
    }

    impl<L> axum::serve::Listener for WatchedListener<L>
    where
        L: axum::serve::Listener,
        L::Io: AsFd,
    {
        type Io = Watched<L::Io>;
        type Addr = L::Addr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            let (io, addr) = self.inner.accept().await;
            (Watched::new(io).half_close(self.half_close), addr)
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.inner.local_addr()
        }
    }

    /// The client's address, as axum's connect info for a [`WatchedListener`] of TCP
    /// connections: serve `app.into_make_service_with_connect_info::<PeerAddr>()`, and extract
    /// `ConnectInfo<PeerAddr>` (the crate's access log reads it too).
    ///
    /// ```no_run
    /// use axum::extract::ConnectInfo;
    /// use axum::{routing::get, Router};
    /// use tower_timeouts::watch::{PeerAddr, WatchedListener};
    ///
    /// # async fn run() -> std::io::Result<()> {
    /// let app = Router::new().route(
    ///     "/",
    ///     get(|ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>| async move { peer.to_string() }),
    /// );
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// let app = app.into_make_service_with_connect_info::<PeerAddr>();
    /// axum::serve(WatchedListener::new(listener), app).await
    /// # }
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PeerAddr(pub std::net::SocketAddr);

    impl<L>
        axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, WatchedListener<L>>>
        for PeerAddr
    where
        L: axum::serve::Listener<Addr = std::net::SocketAddr>,
        L::Io: AsFd,
    {
        fn connect_info(stream: axum::serve::IncomingStream<'_, WatchedListener<L>>) -> Self {
            PeerAddr(*stream.remote_addr())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::*;

    /// Flushes until the flush fails, which it does only once the peer is seen leaving (panics
    /// after a generous bound).
    async fn flush_fails(watched: &mut Watched<UnixStream>) -> io::Error {
        let failed = poll_fn(|cx| match Pin::new(&mut *watched).poll_flush(cx) {
            Poll::Ready(Err(error)) => Poll::Ready(error),
            // Woken when the socket's readiness changes.
            _ => Poll::Pending,
        });
        tokio::time::timeout(Duration::from_secs(10), failed)
            .await
            .expect("the flush fails once the peer left")
    }

    /// Flushes once the reactor has had a turn to see what the peer did.
    async fn flush_after_a_turn(watched: &mut Watched<UnixStream>) -> io::Result<()> {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        watched.flush().await
    }

    fn is_client_left(error: &io::Error) -> bool {
        error.kind() == io::ErrorKind::ConnectionAborted
            && error
                .get_ref()
                .is_some_and(|inner| inner.is::<ClientLeft>())
    }

    #[tokio::test]
    async fn a_close_is_seen_while_nobody_reads_and_bytes_waiting_are_not_one() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut watched = Watched::new(server);
        client
            .write_all(b"a request, and a body nobody reads")
            .await
            .unwrap();
        flush_after_a_turn(&mut watched).await.unwrap();
        flush_after_a_turn(&mut watched).await.unwrap();
        assert!(!watched.has_left());

        drop(client);
        let error = flush_fails(&mut watched).await;
        assert!(is_client_left(&error), "{error:?}");
        assert!(watched.has_left());
        // And it stays so: writes fail too.
        let error = watched.write_all(b"an answer").await.unwrap_err();
        assert!(is_client_left(&error), "{error:?}");
    }

    #[tokio::test]
    async fn a_close_read_after_an_answer_is_the_readers_to_end() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut watched = Watched::new(server);
        client.write_all(b"a request").await.unwrap();
        let mut request = [0; 9];
        watched.read_exact(&mut request).await.unwrap();
        watched.write_all(b"its answer").await.unwrap();
        let mut answer = [0; 10];
        client.read_exact(&mut answer).await.unwrap();
        drop(client);
        assert_eq!(watched.read(&mut [0; 16]).await.unwrap(), 0);
        flush_after_a_turn(&mut watched).await.unwrap();
        assert!(!watched.has_left());
    }

    #[tokio::test]
    async fn a_close_read_while_a_request_is_in_flight_is_leaving() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut watched = Watched::new(server);
        client.write_all(b"a request").await.unwrap();
        let mut request = [0; 9];
        watched.read_exact(&mut request).await.unwrap();
        drop(client);
        // hyper, reading on for the body or for a close, notes the end and waits on.
        assert_eq!(watched.read(&mut [0; 16]).await.unwrap(), 0);
        let error = flush_fails(&mut watched).await;
        assert!(is_client_left(&error), "{error:?}");
    }

    #[tokio::test]
    async fn a_half_close_is_leaving_unless_allowed() {
        for allowed in [false, true] {
            let (server, mut client) = UnixStream::pair().unwrap();
            let mut watched = Watched::new(server).half_close(allowed);
            client.write_all(b"a request").await.unwrap();
            client.shutdown().await.unwrap();
            if allowed {
                flush_after_a_turn(&mut watched).await.unwrap();
                watched.write_all(b"its answer").await.unwrap();
                let mut answer = [0; 10];
                client.read_exact(&mut answer).await.unwrap();
                assert_eq!(&answer, b"its answer");
            } else {
                let error = flush_fails(&mut watched).await;
                assert!(is_client_left(&error), "{error:?}");
            }
        }
    }
}
