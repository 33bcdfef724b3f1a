//! A full-duplex, blocking TLS connection for the replication link: one thread sends while
//! another receives, on plain threads (the rest of mirrorfs is thread-based too).
//!
//! The rustls state sits behind a mutex that is never held across a socket call: a sender encrypts
//! under the lock into a buffer, then writes the buffer under a separate write lock (taken first,
//! so TLS records reach the socket in the order they were made); the receiver reads raw bytes
//! without any lock and decrypts them under the lock. Neither side can block the other on the
//! network.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use mirrorfs_core::wire::{Decoder, Msg};

use crate::net::identity::{self, Fingerprint, Identity};
use crate::site::volume::lock;

/// How long connecting and the TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A socket read returns at least this often, so a receiver can notice a dead peer or a stop.
pub const READ_TICK: Duration = Duration::from_millis(500);
/// A socket write that makes no progress for this long fails (the peer is gone or stuck).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Duplex {
    conn: Mutex<rustls::Connection>,
    sock: TcpStream,
    write: Mutex<()>,
    compress: std::sync::atomic::AtomicBool,
    peer: Option<Fingerprint>,
    /// This side's fingerprint when it connected (a client): a refusal by the peer then says
    /// which fingerprint to trust there.
    own: Option<Fingerprint>,
    /// Bytes written to / read from the socket (TLS included).
    pub bytes_out: std::sync::atomic::AtomicU64,
    pub bytes_in: std::sync::atomic::AtomicU64,
}

fn tune(sock: &TcpStream) -> io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok(())
}

fn handshake(conn: &mut rustls::Connection, sock: &mut TcpStream) -> Result<()> {
    while conn.is_handshaking() {
        // rustls reports a peer's refusal or our verifier's refusal as an io error wrapping a
        // rustls::Error: keep it (typed, for `tls_error`), its text says what to do.
        conn.complete_io(sock)
            .map_err(|e| anyhow::Error::new(e).context("TLS handshake failed"))?;
    }
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

impl Duplex {
    /// Connects to `addr` and authenticates both sides (TLS 1.3, pinned fingerprints).
    pub fn connect(addr: &str, id: &Identity, pinned: Vec<Fingerprint>) -> Result<Duplex> {
        let target = addr
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {addr}"))?
            .next()
            .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
        let mut sock = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
            .with_context(|| format!("cannot connect to {addr}"))?;
        tune(&sock)?;
        let cfg = identity::client_config(id, pinned)?;
        let client = rustls::ClientConnection::new(cfg, identity::server_name())
            .context("cannot start a TLS session")?;
        let mut conn = rustls::Connection::Client(client);
        if let Err(e) = handshake(&mut conn, &mut sock) {
            let hint = tls_error(&e).and_then(|t| identity::refusal_hint(&t, &id.fingerprint));
            return Err(match hint {
                Some(h) => e.context(h),
                None => e,
            });
        }
        let mut d = Duplex::finish(conn, sock)?;
        d.own = Some(id.fingerprint);
        Ok(d)
    }

    /// Authenticates an accepted connection (server side).
    /// The server's side of the TLS handshake, which must complete within [`CONNECT_TIMEOUT`]
    /// however the peer trickles its bytes (each read waits at most for what is left of it), so
    /// an idle or slow unauthenticated connection cannot hold a thread for long.
    pub fn accept(mut sock: TcpStream, cfg: Arc<rustls::ServerConfig>) -> Result<Duplex> {
        let limit = CONNECT_TIMEOUT;
        tune(&sock)?;
        let server = rustls::ServerConnection::new(cfg).context("cannot start a TLS session")?;
        let mut conn = rustls::Connection::Server(server);
        let deadline = std::time::Instant::now() + limit;
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                anyhow::bail!("TLS handshake not completed within {limit:?}");
            }
            sock.set_read_timeout(Some(left))?;
            conn.complete_io(&mut sock)
                .map_err(|e| anyhow::Error::new(e).context("TLS handshake failed"))?;
        }
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        Duplex::finish(conn, sock)
    }

    fn finish(conn: rustls::Connection, sock: TcpStream) -> Result<Duplex> {
        sock.set_read_timeout(Some(READ_TICK))?;
        let peer = identity::peer_fingerprint(&conn);
        Ok(Duplex {
            conn: Mutex::new(conn),
            sock,
            write: Mutex::new(()),
            compress: false.into(),
            peer,
            own: None,
            bytes_out: 0.into(),
            bytes_in: 0.into(),
        })
    }

    /// The authenticated peer's fingerprint.
    pub fn peer(&self) -> Option<Fingerprint> {
        self.peer
    }

    /// Compress bodies of messages sent from now on (negotiated in Hello/Welcome).
    pub fn set_compress(&self, on: bool) {
        self.compress
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends one message (blocks until the socket took it, at most [`WRITE_TIMEOUT`] without
    /// progress). Safe to call from several threads.
    pub fn send(&self, msg: &Msg) -> io::Result<usize> {
        let bytes = self.encode(msg);
        self.send_raw(&bytes)?;
        Ok(bytes.len())
    }

    /// The wire frame of `msg` as this link sends it (compressed if negotiated).
    pub fn encode(&self, msg: &Msg) -> Vec<u8> {
        msg.encode(self.compress.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sends bytes that are already a wire frame (or, in fault tests, deliberately are not).
    pub fn send_raw(&self, plain: &[u8]) -> io::Result<()> {
        let _w = lock(&self.write);
        let mut out = Vec::with_capacity(plain.len() + 256);
        {
            let mut c = lock(&self.conn);
            // rustls buffers a bounded amount of plaintext: encrypt in steps.
            let mut rest = plain;
            while !rest.is_empty() {
                let n = c.writer().write(rest)?;
                rest = &rest[n..];
                while c.wants_write() {
                    c.write_tls(&mut out)?;
                }
                if n == 0 && !c.wants_write() {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the TLS session accepts no more data",
                    ));
                }
            }
        }
        (&self.sock).write_all(&out)?;
        self.bytes_out
            .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The receiving loop's next message: `Ok(None)` once `done` is set; an error (worded by
    /// `silent`, e.g. "the mirror sent nothing…") when the peer has been silent for `dead_after`
    /// since `heard`, which a message moves to now.
    pub fn next_or_dead(
        &self,
        dec: &mut Decoder,
        done: &AtomicBool,
        heard: &mut Instant,
        dead_after: Duration,
        silent: impl Fn() -> anyhow::Error,
    ) -> Result<Option<Msg>> {
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            if let Some(msg) = self.recv(dec)? {
                *heard = Instant::now();
                return Ok(Some(msg));
            }
            if heard.elapsed() > dead_after {
                return Err(silent());
            }
        }
        Ok(None)
    }

    /// Receives the next message. `Ok(None)` means nothing arrived within [`READ_TICK`] (call
    /// again); an error means the connection is finished (closed, reset, or invalid bytes).
    /// Only one thread may receive.
    pub fn recv(&self, dec: &mut Decoder) -> Result<Option<Msg>> {
        if let Some(m) = dec.next_msg()? {
            return Ok(Some(m));
        }
        // Plaintext already decrypted but not yet taken?
        if self.take_plain(dec)? {
            if let Some(m) = dec.next_msg()? {
                return Ok(Some(m));
            }
        }
        let mut raw = vec![0u8; 64 << 10];
        let n = match (&self.sock).read(&mut raw) {
            Ok(0) => return Err(anyhow!("the peer closed the connection")),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(anyhow!("connection error: {e}")),
        };
        self.bytes_in
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        let wants_write = {
            let mut c = lock(&self.conn);
            let mut rd = &raw[..n];
            while !rd.is_empty() {
                c.read_tls(&mut rd)?;
                c.process_new_packets().map_err(|e| {
                    // In TLS 1.3 a server refuses a client's certificate after the client's
                    // handshake is done: the alert arrives here.
                    let hint = self.own.and_then(|own| identity::refusal_hint(&e, &own));
                    let err = anyhow!("TLS error from the peer's bytes: {e}");
                    match hint {
                        Some(h) => err.context(h),
                        None => err,
                    }
                })?;
                // Drain the plaintext as it comes, so rustls's bounded buffer never fills. The
                // decoder grows by at most one raw read (64 KiB) beyond the frame it waits for:
                // `recv` takes a whole message out before it reads again.
                drain_plain(&mut c, dec)?;
            }
            c.wants_write()
        };
        if wants_write {
            // TLS wants to answer (a key update): flush if no sender is busy; else the next
            // send flushes it.
            if let Ok(_w) = self.write.try_lock() {
                let mut out = Vec::new();
                {
                    let mut c = lock(&self.conn);
                    while c.wants_write() {
                        c.write_tls(&mut out)?;
                    }
                }
                (&self.sock).write_all(&out)?;
            }
        }
        Ok(dec.next_msg()?)
    }

    /// Moves decrypted bytes into the decoder. Returns whether anything moved.
    fn take_plain(&self, dec: &mut Decoder) -> Result<bool> {
        let mut c = lock(&self.conn);
        drain_plain(&mut c, dec)
    }

    /// Closes both directions; a blocked receiver returns with an error.
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl Drop for Duplex {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn drain_plain(c: &mut rustls::Connection, dec: &mut Decoder) -> Result<bool> {
    let mut moved = false;
    let mut buf = [0u8; 16 << 10];
    loop {
        match c.reader().read(&mut buf) {
            Ok(0) => return Err(anyhow!("the peer closed the connection")),
            Ok(n) => {
                dec.push(&buf[..n]);
                moved = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
            Err(e) => return Err(anyhow!("TLS stream error: {e}")),
        }
    }
}

/// The rustls error inside an anyhow chain, if any.
fn tls_error(e: &anyhow::Error) -> Option<rustls::Error> {
    for cause in e.chain() {
        if let Some(t) = cause.downcast_ref::<rustls::Error>() {
            return Some(t.clone());
        }
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(t.clone());
            }
        }
    }
    None
}
