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

/// The TLS exporter label of the UDP data path's keys (`Duplex::datagram_keys`).
pub const DATAGRAM_EXPORTER_LABEL: &[u8] = b"EXPORTER-mirrorfs-datagram-v1";

/// The UDP data path's keys for one end of a connection.
pub struct DatagramKeys {
    /// Seals what this end sends.
    pub send: [u8; mirrorfs_core::datagram::KEY_LEN],
    /// Opens what this end receives.
    pub receive: [u8; mirrorfs_core::datagram::KEY_LEN],
    /// The session id carried in every packet header (both directions).
    pub session: u32,
}

impl DatagramKeys {
    /// Exported bytes: the client-to-server key, the server-to-client key, the session id
    /// (little endian). The client is the end that connected (a primary, or a witness's client).
    fn split(b: &[u8], client: bool) -> DatagramKeys {
        const K: usize = mirrorfs_core::datagram::KEY_LEN;
        let mut c2s = [0u8; K];
        let mut s2c = [0u8; K];
        c2s.copy_from_slice(&b[..K]);
        s2c.copy_from_slice(&b[K..2 * K]);
        let mut id = [0u8; 4];
        id.copy_from_slice(&b[2 * K..2 * K + 4]);
        let (send, receive) = if client { (c2s, s2c) } else { (s2c, c2s) };
        DatagramKeys {
            send,
            receive,
            session: u32::from_le_bytes(id),
        }
    }
}

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

    /// Sets the connection's TCP congestion control (`TCP_CONGESTION`, e.g. `cubic`, `bbr`;
    /// any algorithm the kernel has, for a process with `CAP_NET_ADMIN`).
    pub fn set_congestion(&self, algo: &str) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid socket and a buffer of the length passed.
        let r = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                algo.as_ptr().cast(),
                algo.len() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The peer's address (the UDP data path's datagrams go to the same host).
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.sock.peer_addr()
    }

    /// The authenticated peer's fingerprint.
    pub fn peer(&self) -> Option<Fingerprint> {
        self.peer
    }

    /// The keys and session id of the UDP data path that runs beside this connection, derived
    /// from its TLS session with an exporter (RFC 5705 / RFC 8446 §7.5, label
    /// [`DATAGRAM_EXPORTER_LABEL`]): both ends compute the same bytes, nobody else can, and a
    /// new connection gives new keys. One key per direction, so that a packet reflected back to
    /// its sender never opens.
    pub fn datagram_keys(&self) -> Result<DatagramKeys> {
        let mut out = [0u8; 2 * mirrorfs_core::datagram::KEY_LEN + 4];
        let conn = lock(&self.conn);
        let out = match &*conn {
            rustls::Connection::Client(c) => {
                c.export_keying_material(&mut out, DATAGRAM_EXPORTER_LABEL, None)
            }
            rustls::Connection::Server(s) => {
                s.export_keying_material(&mut out, DATAGRAM_EXPORTER_LABEL, None)
            }
        }
        .map_err(|e| anyhow!("cannot derive the UDP data path's keys from the TLS session: {e}"))?;
        let client = matches!(&*conn, rustls::Connection::Client(_));
        Ok(DatagramKeys::split(out, client))
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

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorfs_core::datagram::{Kind, Opener, Sealer};

    /// A primary (client) and a daemon (server) over loopback TLS derive the same keys, each
    /// the other's send key as its receive key; a packet sealed by one opens at the other and
    /// not back at its sender; another connection derives other keys.
    #[test]
    fn both_ends_derive_the_datagram_keys_of_their_session() {
        let (c_id, _) = Identity::generate("primary").expect("identity");
        let (s_id, _) = Identity::generate("mirror").expect("identity");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let cfg = identity::server_config(&s_id, vec![c_id.fingerprint]).expect("server cfg");
        let server = std::thread::spawn(move || {
            (0..2)
                .map(|_| {
                    let (sock, _) = listener.accept().expect("accept");
                    let d = Duplex::accept(sock, cfg.clone()).expect("tls accept");
                    d.datagram_keys().expect("server keys")
                })
                .collect::<Vec<_>>()
        });
        let keys: Vec<DatagramKeys> = (0..2)
            .map(|_| {
                let d = Duplex::connect(&addr, &c_id, vec![s_id.fingerprint]).expect("connect");
                d.datagram_keys().expect("client keys")
            })
            .collect();
        let theirs = server.join().expect("server thread");
        let (c, s) = (&keys[0], &theirs[0]);
        assert_eq!(c.send, s.receive);
        assert_eq!(c.receive, s.send);
        assert_eq!(c.session, s.session);
        assert_ne!(c.send, c.receive, "one key per direction");
        assert_ne!(
            keys[0].send, keys[1].send,
            "a new connection derives new keys"
        );

        let mut seal = Sealer::new(&c.send, c.session);
        let (_, packet) = seal.seal(Kind::Data, b"record bytes").expect("seal");
        let mut at_daemon = Opener::new(&s.receive, s.session);
        let opened = at_daemon.open(&packet).expect("opens at the other end");
        assert_eq!(opened.body, b"record bytes");
        let mut reflected = Opener::new(&c.receive, c.session);
        assert!(
            reflected.open(&packet).is_err(),
            "a reflected packet never opens"
        );
    }
}
