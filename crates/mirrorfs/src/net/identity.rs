//! Machine identities and peer pinning for network mirrors.
//!
//! Every machine that takes part in network mirroring (a primary running `mirrorfs mount ...
//! --mirror mirror://HOST:PORT`, or a mirror daemon running `mirrorfs serve DIR --listen ADDR`)
//! has an *identity*: an ECDSA P-256 key pair with a self-signed certificate, kept in
//! `CONFIG/identity.pem` (mode 0600). It is named by its *fingerprint*, `blake3:` followed by the
//! 64 lowercase hex digits of the BLAKE3 hash of the certificate's DER encoding.
//!
//! There is no certificate authority. Each side lists the fingerprints it accepts in
//! `CONFIG/peers` (one `FINGERPRINT NAME...` per line, `#` starts a comment line), and the TLS
//! 1.3 connection between them is mutually authenticated: a peer is accepted if and only if the
//! fingerprint of the certificate it presents is pinned, and the handshake signature proves it
//! holds the matching private key. Host names, CA chains and validity dates are ignored.
//!
//! `CONFIG` is `/etc/mirrorfs` unless `MIRRORFS_CONFIG` or a `--config DIR` option says
//! otherwise (see [`config_dir`]).

// The network mirror code that calls into this module is not wired into main.rs yet.
#![allow(dead_code)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    ServerConfig, SignatureScheme,
};

/// Configuration directory used when neither `--config DIR` nor `MIRRORFS_CONFIG` is given.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/mirrorfs";
/// Environment variable that overrides [`DEFAULT_CONFIG_DIR`].
pub const CONFIG_ENV: &str = "MIRRORFS_CONFIG";
/// Name of the identity file (private key + certificate, PEM) inside the config directory.
pub const IDENTITY_FILE: &str = "identity.pem";
/// Name of the pinned peers file inside the config directory.
pub const PEERS_FILE: &str = "peers";
/// TLS server name the client asks for. Peers are pinned by fingerprint, so the name is never
/// checked; it only has to be a valid DNS name.
pub const SERVER_NAME: &str = "mirrorfs";

const FINGERPRINT_PREFIX: &str = "blake3:";
const PEERS_HEADER: &str = "# mirrorfs trusted peers: one `FINGERPRINT NAME` per line \
     (add with `mirrorfs trust FINGERPRINT NAME`)\n";

/// The config directory to use: `flag` (from `--config DIR`) if given, else `$MIRRORFS_CONFIG`
/// if set and non-empty, else [`DEFAULT_CONFIG_DIR`].
pub fn config_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_CONFIG_DIR),
    }
}

// ---------------------------------------------------------------------------------------------
// Fingerprint

/// BLAKE3 hash of a certificate's DER encoding; written `blake3:` + 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_cert(cert_der: &[u8]) -> Fingerprint {
        Fingerprint(*blake3::hash(cert_der).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FINGERPRINT_PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a [`Fingerprint`]; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fingerprint `{input}`: {reason}; expected `blake3:` followed by 64 hex digits, \
         as printed by `mirrorfs init` on the peer"
)]
pub struct ParseFingerprintError {
    input: String,
    reason: String,
}

impl FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    /// Accepts `blake3:HEX` or bare `HEX` (64 hex digits, either case), surrounding white space
    /// ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseFingerprintError {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        let hex = match t.split_once(':') {
            None => t,
            Some(("blake3", hex)) => hex,
            Some((algo, _)) => {
                return Err(err(format!(
                    "unsupported hash `{algo}` (only blake3 fingerprints are used)"
                )))
            }
        };
        if hex.is_empty() {
            return Err(err("it is empty".to_string()));
        }
        if let Some((i, c)) = hex.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
            return Err(err(format!(
                "`{c}` at position {} is not a hex digit",
                i + (t.len() - hex.len())
            )));
        }
        if hex.len() != 64 {
            return Err(err(format!("it has {} hex digits, not 64", hex.len())));
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|e| err(format!("bad hex digits: {e}")))?;
        }
        Ok(Fingerprint(bytes))
    }
}

// ---------------------------------------------------------------------------------------------
// Identity

/// This machine's key pair and self-signed certificate.
pub struct Identity {
    /// The self-signed certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, PKCS#8 DER.
    pub key_der: PrivatePkcs8KeyDer<'static>,
    /// BLAKE3 of `cert_der`.
    pub fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    // Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl Identity {
    /// Generates a new ECDSA P-256 key pair with a self-signed certificate whose subject common
    /// name is `name` (informational only: peers are pinned by fingerprint). Also returns the
    /// identity file's PEM text: the PKCS#8 private key, then the certificate.
    pub fn generate(name: &str) -> Result<(Identity, String)> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("cannot generate an ECDSA P-256 key pair")?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .context("cannot build certificate parameters")?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params
            .self_signed(&key)
            .context("cannot self-sign the certificate")?;
        let cert_der = cert.der().clone();
        let pem = key.serialize_pem() + &cert.pem();
        let id = Identity {
            fingerprint: Fingerprint::of_cert(&cert_der),
            cert_der,
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
        };
        Ok((id, pem))
    }

    /// Parses an identity file's contents; `path` is for messages.
    fn from_pem(pem: &[u8], path: &Path) -> Result<Identity> {
        let mut key: Option<PrivatePkcs8KeyDer<'static>> = None;
        let mut cert: Option<CertificateDer<'static>> = None;
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
            let (kind, der) = item.map_err(|e| {
                anyhow!(
                    "{} is not a valid PEM file ({e}); move it away and run `mirrorfs init` to \
                     make a new identity (peers must then trust the new fingerprint)",
                    path.display()
                )
            })?;
            let dup = match kind {
                SectionKind::PrivateKey => key.replace(PrivatePkcs8KeyDer::from(der)).is_some(),
                SectionKind::Certificate => cert.replace(CertificateDer::from(der)).is_some(),
                other => bail!(
                    "{}: unexpected PEM section {other:?}; it must hold exactly one PKCS#8 \
                     `PRIVATE KEY` and one `CERTIFICATE`",
                    path.display()
                ),
            };
            if dup {
                bail!(
                    "{}: more than one {kind:?} section; it must hold exactly one PKCS#8 \
                     `PRIVATE KEY` and one `CERTIFICATE`",
                    path.display()
                );
            }
        }
        let (Some(key_der), Some(cert_der)) = (key, cert) else {
            bail!(
                "{} must hold one PKCS#8 `PRIVATE KEY` and one `CERTIFICATE`; move it away and \
                 run `mirrorfs init` to make a new identity",
                path.display()
            );
        };
        // The key must be usable by the TLS stack and belong to the certificate.
        let signing_key = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key_der.clone_key()))
            .with_context(|| format!("{}: unusable private key", path.display()))?;
        CertifiedKey::new(vec![cert_der.clone()], signing_key)
            .keys_match()
            .map_err(|e| {
                anyhow!(
                    "{}: the private key does not belong to the certificate ({e}); move it away \
                     and run `mirrorfs init` to make a new identity",
                    path.display()
                )
            })?;
        Ok(Identity {
            fingerprint: Fingerprint::of_cert(&cert_der),
            cert_der,
            key_der,
        })
    }
}

/// Creates this machine's identity in `dir` (created, mode 0700, if missing) unless one exists
/// already, which is then loaded and returned: an identity is never overwritten. `name` becomes
/// the certificate's common name (informational). Prints nothing.
pub fn init(dir: &Path, name: &str) -> Result<Identity> {
    check_name(name)?;
    let path = dir.join(IDENTITY_FILE);
    if fs::symlink_metadata(&path).is_ok() {
        return load(dir);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create config directory {}", dir.display()))?;
    let (id, pem) = Identity::generate(name)?;
    let tmp = write_temp(dir, IDENTITY_FILE, pem.as_bytes(), 0o600)?;
    // A hard link is a rename that never replaces: if another `mirrorfs init` won the race,
    // keep its identity.
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(id)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load(dir),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Loads this machine's identity from `dir`. Fails if there is none (telling to run
/// `mirrorfs init`) and refuses an identity file that group or others could read.
pub fn load(dir: &Path) -> Result<Identity> {
    let path = dir.join(IDENTITY_FILE);
    let meta = match fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "no identity in {}: run `mirrorfs init` (with the same --config DIR or \
             {CONFIG_ENV}) to create one",
            dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "{} holds a private key but is accessible by group or others (mode {mode:04o}): \
             run `chmod 600 {}`, and make a new identity if others may have copied it",
            path.display(),
            path.display()
        );
    }
    let pem = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Identity::from_pem(&pem, &path)
}

fn check_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        bail!("the name must not be empty (for example this machine's host name)");
    }
    if name.chars().any(char::is_control) {
        bail!("the name {name:?} must not contain control characters or line breaks");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Peers

/// Parses the peers file of `dir`: `(fingerprint, name)` in file order. A missing file is an
/// empty list.
pub fn peers(dir: &Path) -> Result<Vec<(Fingerprint, String)>> {
    let path = dir.join(PEERS_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse_peers(&text, &path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The pinned fingerprints of `dir`'s peers file, for [`client_config`] / [`server_config`].
pub fn pinned(dir: &Path) -> Result<Vec<Fingerprint>> {
    Ok(peers(dir)?.into_iter().map(|(fp, _)| fp).collect())
}

fn parse_peers(text: &str, path: &Path) -> Result<Vec<(Fingerprint, String)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (fp, name) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let fp: Fingerprint = fp.parse().map_err(|e| {
            anyhow!(
                "{}:{}: {e}; fix or remove that line (format: `FINGERPRINT NAME`, `#` for \
                 comments)",
                path.display(),
                n + 1
            )
        })?;
        out.push((fp, name.trim().to_string()));
    }
    Ok(out)
}

/// Adds `fp` (called `name`) to the peers file of `dir`, creating both if needed. Returns
/// `false`, changing nothing, if `fp` is already trusted (whatever its name there). The file is
/// replaced atomically; comments and other lines are kept as they are.
pub fn trust(dir: &Path, fp: &Fingerprint, name: &str) -> Result<bool> {
    check_name(name)?;
    let path = dir.join(PEERS_FILE);
    let mut text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => PEERS_HEADER.to_string(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if parse_peers(&text, &path)?.iter().any(|(p, _)| p == fp) {
        return Ok(false);
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{fp} {}\n", name.trim()));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create config directory {}", dir.display()))?;
    let mode = fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o644);
    let tmp = write_temp(dir, PEERS_FILE, text.as_bytes(), mode)?;
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot replace {}", path.display()));
    }
    sync_dir(dir)?;
    Ok(true)
}

/// Writes `data` to a new temporary file next to `dir/name` with `mode`, fsynced; returns its
/// path. The caller renames (or links) it into place and fsyncs the directory.
fn write_temp(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{name}.tmp.{}.{nanos}", std::process::id()));
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits of `mode`; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    Ok(tmp)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

// ---------------------------------------------------------------------------------------------
// TLS

/// The crypto provider: ring, TLS 1.3 cipher suites only.
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn private_key(id: &Identity) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(id.key_der.clone_key())
}

/// TLS configuration for connecting to a mirror daemon: TLS 1.3 only, presents `id`, accepts
/// only a server whose certificate fingerprint is in `pinned`. Connect with
/// [`server_name()`] as the name.
pub fn client_config(id: &Identity, pinned: Vec<Fingerprint>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(provider());
    let verifier = Arc::new(PinnedVerifier {
        pinned,
        reload: None,
        algorithms: provider.signature_verification_algorithms,
        peer_role: "server",
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not supported by the crypto provider")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert_der.clone()], private_key(id))
        .context("the identity's key or certificate is not usable for TLS")?;
    Ok(Arc::new(config))
}

/// TLS configuration for a mirror daemon: TLS 1.3 only, presents `id`, requires a client
/// certificate and accepts only clients whose certificate fingerprint is in `pinned`.
pub fn server_config(id: &Identity, pinned: Vec<Fingerprint>) -> Result<Arc<ServerConfig>> {
    server_config_with(id, pinned, None)
}

/// [`server_config`] that reads `dir`'s peers file again at each handshake (a `mirrorfs trust`
/// takes effect at the next connection; `pinned` is used if the file cannot be read).
pub fn server_config_reloading(
    id: &Identity,
    dir: &Path,
    pinned: Vec<Fingerprint>,
) -> Result<Arc<ServerConfig>> {
    server_config_with(id, pinned, Some(dir.to_path_buf()))
}

fn server_config_with(
    id: &Identity,
    pinned: Vec<Fingerprint>,
    reload: Option<std::path::PathBuf>,
) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(provider());
    let verifier = Arc::new(PinnedVerifier {
        pinned,
        reload,
        algorithms: provider.signature_verification_algorithms,
        peer_role: "client",
    });
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not supported by the crypto provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert_der.clone()], private_key(id))
        .context("the identity's key or certificate is not usable for TLS")?;
    Ok(Arc::new(config))
}

/// The server name a client passes to rustls (never checked: pinning replaces names).
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(SERVER_NAME)
            .unwrap_or_else(|_| unreachable!("SERVER_NAME is a valid DNS name")),
    )
}

/// The fingerprint of the certificate the peer presented, once the handshake got that far.
/// Works on `rustls::ClientConnection`/`ServerConnection` (they deref to `CommonState`).
pub fn peer_fingerprint(conn: &CommonState) -> Option<Fingerprint> {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| Fingerprint::of_cert(cert))
}

/// A hint for a handshake error seen on this side that the *peer* caused by refusing us: TLS
/// alerts carry no text, so the peer's explanation (naming our fingerprint) is only in its own
/// log. Returns `None` for other errors.
pub fn refusal_hint(err: &rustls::Error, own: &Fingerprint) -> Option<String> {
    match err {
        rustls::Error::AlertReceived(
            AlertDescription::HandshakeFailure
            | AlertDescription::CertificateUnknown
            | AlertDescription::BadCertificate
            | AlertDescription::AccessDenied,
        ) => Some(format!(
            "the peer refused the TLS handshake; if it does not trust this machine yet, run \
             `mirrorfs trust {own} NAME` on the peer (its log names the fingerprint it refused)"
        )),
        _ => None,
    }
}

/// Accepts an end-entity certificate iff its fingerprint is pinned; ignores names, chains and
/// dates; verifies handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct PinnedVerifier {
    pinned: Vec<Fingerprint>,
    /// A config directory whose peers file is read again at each verification.
    reload: Option<std::path::PathBuf>,
    algorithms: WebPkiSupportedAlgorithms,
    /// "server" or "client": the role of the peer being verified, for messages.
    peer_role: &'static str,
}

impl PinnedVerifier {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = Fingerprint::of_cert(end_entity);
        let reloaded = self.reload.as_deref().and_then(|d| match pinned(d) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("cannot reload the trusted peers: {e:#}; using those read at start");
                None
            }
        });
        if reloaded.as_ref().unwrap_or(&self.pinned).contains(&fp) {
            return Ok(());
        }
        let then = if self.reload.is_some() {
            "the next connection is checked against it (trusted peers are reloaded at each handshake)"
        } else {
            "then restart this side (its trusted peers are read when it starts)"
        };
        Err(rustls::Error::General(format!(
            "the {} presented certificate {fp}, which this machine does not trust; if that peer \
             is yours, run `mirrorfs trust {fp} NAME` on this machine: {then}",
            self.peer_role
        )))
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not accepted: mirrorfs peers use TLS 1.3 only".to_string(),
        ))
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::Duration;

    use rustls::{ClientConnection, ProtocolVersion, ServerConnection, StreamOwned};

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    fn new_identity(name: &str) -> Identity {
        Identity::generate(name).expect("generate").0
    }

    // ---- fingerprints -----------------------------------------------------------------------

    #[test]
    fn identity_fingerprint_format_and_parse_round_trip() {
        let id = new_identity("a");
        let s = id.fingerprint.to_string();
        assert!(s.starts_with("blake3:"), "{s}");
        let hex = &s["blake3:".len()..];
        assert_eq!(hex.len(), 64);
        assert!(hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(hex, blake3::hash(&id.cert_der).to_hex().as_str());
        assert_eq!(s.parse::<Fingerprint>(), Ok(id.fingerprint));
        assert_eq!(hex.parse::<Fingerprint>(), Ok(id.fingerprint));
        assert_eq!(
            format!("  {s}\n").parse::<Fingerprint>(),
            Ok(id.fingerprint)
        );
        assert_eq!(
            hex.to_uppercase().parse::<Fingerprint>(),
            Ok(id.fingerprint)
        );
        assert_eq!(format!("{:?}", id.fingerprint), s);
        assert_eq!(Fingerprint::of_cert(&id.cert_der), id.fingerprint);
    }

    #[test]
    fn identity_fingerprint_rejects() {
        let good = "ab".repeat(32);
        for (bad, why) in [
            (String::new(), "empty"),
            ("blake3:".to_string(), "empty"),
            (format!("sha256:{good}"), "unsupported hash `sha256`"),
            (format!("blake3:{}", &good[..62]), "62 hex digits, not 64"),
            (format!("blake3:{good}00"), "66 hex digits, not 64"),
            (format!("blake3:{}zz", &good[..62]), "`z` at position 69"),
            (format!("blake3: {good}"), "` ` at position 7"),
            (format!("{good} name"), "` ` at position 64"),
        ] {
            let err = bad.parse::<Fingerprint>().expect_err(&bad).to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(
                err.contains("expected `blake3:` followed by 64 hex digits"),
                "{err}"
            );
        }
    }

    // ---- identity files ---------------------------------------------------------------------

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
    }

    #[test]
    fn identity_init_is_idempotent_and_private() {
        let d = tmp();
        let dir = d.path().join("conf");
        let a = init(&dir, "primary").expect("init");
        let path = dir.join(IDENTITY_FILE);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let pem = fs::read_to_string(&path).expect("read");
        assert!(pem.contains("-----BEGIN PRIVATE KEY-----"), "{pem}");
        assert!(pem.contains("-----BEGIN CERTIFICATE-----"), "{pem}");
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(IDENTITY_FILE)]);

        let b = init(&dir, "other name").expect("init again");
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.cert_der, b.cert_der);
        assert_eq!(a.key_der.secret_pkcs8_der(), b.key_der.secret_pkcs8_der());
        assert_eq!(fs::read_to_string(&path).expect("read"), pem, "overwritten");
        let c = load(&dir).expect("load");
        assert_eq!(c.fingerprint, a.fingerprint);
        assert!(!format!("{c:?}").contains("key_der"), "{c:?}");

        // Another directory gets another identity.
        let other = init(&d.path().join("other"), "x").expect("init other");
        assert_ne!(other.fingerprint, a.fingerprint);

        assert!(init(&d.path().join("n"), " ").is_err());
        assert!(init(&d.path().join("n"), "a\nb").is_err());
    }

    #[test]
    fn identity_load_refuses_missing_and_readable_and_broken() {
        let d = tmp();
        let err = load(d.path()).expect_err("no identity").to_string();
        assert!(err.contains("no identity in"), "{err}");
        assert!(err.contains("run `mirrorfs init`"), "{err}");
        assert!(err.contains(&d.path().display().to_string()), "{err}");

        init(d.path(), "me").expect("init");
        let path = d.path().join(IDENTITY_FILE);
        for m in [0o644, 0o640, 0o604] {
            fs::set_permissions(&path, fs::Permissions::from_mode(m)).expect("chmod");
            let err = load(d.path()).expect_err("readable").to_string();
            assert!(err.contains(&format!("{m:04o}")), "{err}");
            assert!(err.contains("chmod 600"), "{err}");
            // init does not silently accept it either.
            assert!(init(d.path(), "me").is_err());
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        load(d.path()).expect("load after chmod 600");

        // A key that does not belong to the certificate is refused.
        let (_, other_pem) = Identity::generate("other").expect("generate");
        let pem = fs::read_to_string(&path).expect("read");
        let mine_cert = &pem[pem.find("-----BEGIN CERTIFICATE").expect("cert")..];
        let other_key = &other_pem[..other_pem.find("-----BEGIN CERTIFICATE").expect("cert")];
        fs::write(&path, format!("{other_key}{mine_cert}")).expect("write");
        let err = format!("{:#}", load(d.path()).expect_err("mismatch"));
        assert!(err.contains("does not belong"), "{err}");

        fs::write(&path, mine_cert).expect("write");
        let err = load(d.path()).expect_err("no key").to_string();
        assert!(err.contains("must hold one PKCS#8"), "{err}");
    }

    // ---- peers --------------------------------------------------------------------------------

    #[test]
    fn identity_trust_and_peers_round_trip() {
        let d = tmp();
        let dir = d.path().join("conf");
        assert!(peers(&dir).expect("no file").is_empty());
        let a = new_identity("a").fingerprint;
        let b = new_identity("b").fingerprint;
        assert!(trust(&dir, &a, "mirror one").expect("trust a"));
        assert!(!trust(&dir, &a, "renamed").expect("trust a again"));
        assert_eq!(
            peers(&dir).expect("peers"),
            vec![(a, "mirror one".to_string())]
        );

        // Hand-edited comments, blank lines and bare-hex fingerprints are kept and understood.
        let path = dir.join(PEERS_FILE);
        let mut text = fs::read_to_string(&path).expect("read");
        assert!(text.starts_with('#'), "{text}");
        let bare = b.to_string()["blake3:".len()..].to_string();
        text.push_str(&format!("\n   # backup box\n{bare}\tbackup   box  \n"));
        fs::write(&path, &text).expect("write");
        let c = new_identity("c").fingerprint;
        assert!(!trust(&dir, &b, "b").expect("b already there"));
        assert!(trust(&dir, &c, "c").expect("trust c"));
        let after = fs::read_to_string(&path).expect("read");
        assert!(after.starts_with(&text), "{after}");
        assert_eq!(
            peers(&dir).expect("peers"),
            vec![
                (a, "mirror one".to_string()),
                (b, "backup   box".to_string()),
                (c, "c".to_string())
            ]
        );
        assert_eq!(pinned(&dir).expect("pinned"), vec![a, b, c]);

        fs::write(&path, format!("{text}not-a-fingerprint x\n")).expect("write");
        let err = peers(&dir).expect_err("bad line").to_string();
        assert!(err.contains("peers:6:"), "{err}");
        assert!(err.contains("not-a-fingerprint"), "{err}");
        assert!(
            trust(&dir, &c, "c").is_err(),
            "trust must not build on a broken file"
        );
    }

    // ---- TLS ------------------------------------------------------------------------------------

    const TIMEOUT: Option<Duration> = Some(Duration::from_secs(10));

    struct Outcome {
        version: Option<ProtocolVersion>,
        peer: Option<Fingerprint>,
        received: Vec<u8>,
    }

    fn flatten(e: io::Error) -> String {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(tls) => format!("tls: {tls}"),
            None => format!("io: {e}"),
        }
    }

    /// Runs a server (in a thread) and a client over loopback TCP; each sends its greeting and
    /// reads the other's.
    fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (Result<Outcome, String>, Result<Outcome, String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let srv = thread::spawn(move || -> Result<Outcome, String> {
            let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
            sock.set_read_timeout(TIMEOUT).map_err(|e| e.to_string())?;
            let conn = ServerConnection::new(server).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, sock);
            let mut buf = [0u8; 12];
            tls.read_exact(&mut buf).map_err(flatten)?;
            tls.write_all(b"hello client").map_err(flatten)?;
            tls.flush().map_err(flatten)?;
            tls.conn.send_close_notify();
            let _ = tls.flush();
            Ok(Outcome {
                version: tls.conn.protocol_version(),
                peer: peer_fingerprint(&tls.conn),
                received: buf.to_vec(),
            })
        });
        let cli = (|| -> Result<Outcome, String> {
            let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            sock.set_read_timeout(TIMEOUT).map_err(|e| e.to_string())?;
            let conn = ClientConnection::new(client, server_name()).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, sock);
            tls.write_all(b"hello server").map_err(flatten)?;
            tls.flush().map_err(flatten)?;
            let mut buf = [0u8; 12];
            tls.read_exact(&mut buf).map_err(flatten)?;
            Ok(Outcome {
                version: tls.conn.protocol_version(),
                peer: peer_fingerprint(&tls.conn),
                received: buf.to_vec(),
            })
        })();
        let srv = srv.join().expect("server thread");
        (srv, cli)
    }

    #[test]
    fn identity_tls13_handshake_between_pinned_peers() {
        let (s, c) = (new_identity("mirror"), new_identity("primary"));
        let (srv, cli) = exchange(
            server_config(&s, vec![c.fingerprint]).expect("server config"),
            client_config(&c, vec![s.fingerprint]).expect("client config"),
        );
        let srv = srv.expect("server side");
        let cli = cli.expect("client side");
        assert_eq!(srv.received, b"hello server");
        assert_eq!(cli.received, b"hello client");
        assert_eq!(srv.version, Some(ProtocolVersion::TLSv1_3));
        assert_eq!(cli.version, Some(ProtocolVersion::TLSv1_3));
        assert_eq!(srv.peer, Some(c.fingerprint));
        assert_eq!(cli.peer, Some(s.fingerprint));
    }

    #[test]
    fn identity_tls_server_refuses_unpinned_client() {
        let (s, c, x) = (new_identity("s"), new_identity("c"), new_identity("x"));
        let (srv, cli) = exchange(
            server_config(&s, vec![x.fingerprint]).expect("server config"),
            client_config(&c, vec![s.fingerprint]).expect("client config"),
        );
        let srv = srv.err().expect("server must refuse");
        assert!(srv.contains(&c.fingerprint.to_string()), "{srv}");
        assert!(
            srv.contains(&format!("run `mirrorfs trust {} NAME`", c.fingerprint)),
            "{srv}"
        );
        assert!(srv.contains("the client presented"), "{srv}");
        let cli = cli.err().expect("client must fail");
        assert!(cli.contains("received fatal alert"), "{cli}");
        let hint = refusal_hint(
            &rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
            &c.fingerprint,
        )
        .expect("hint");
        assert!(
            hint.contains(&format!("mirrorfs trust {}", c.fingerprint)),
            "{hint}"
        );
        assert!(refusal_hint(&rustls::Error::HandshakeNotComplete, &c.fingerprint).is_none());
    }

    #[test]
    fn identity_tls_client_refuses_unpinned_server() {
        let (s, c) = (new_identity("s"), new_identity("c"));
        let (srv, cli) = exchange(
            server_config(&s, vec![c.fingerprint]).expect("server config"),
            client_config(&c, vec![c.fingerprint]).expect("client config"),
        );
        let cli = cli.err().expect("client must refuse");
        assert!(cli.contains(&s.fingerprint.to_string()), "{cli}");
        assert!(
            cli.contains(&format!("run `mirrorfs trust {} NAME`", s.fingerprint)),
            "{cli}"
        );
        assert!(cli.contains("the server presented"), "{cli}");
        let srv = srv.err().expect("server must fail");
        assert!(srv.contains("received fatal alert"), "{srv}");
    }

    /// A server that presents a pinned certificate but signs with another key (it has a copy of
    /// the certificate, not the private key) must be refused: pinning alone is not enough, the
    /// handshake signature is checked.
    #[test]
    fn identity_tls_refuses_pinned_cert_with_wrong_key() {
        #[derive(Debug)]
        struct Fixed(Arc<CertifiedKey>);
        impl rustls::server::ResolvesServerCert for Fixed {
            fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
                Some(self.0.clone())
            }
        }
        let (victim, thief, c) = (new_identity("v"), new_identity("t"), new_identity("c"));
        let provider = Arc::new(provider());
        let key = provider
            .key_provider
            .load_private_key(private_key(&thief))
            .expect("key");
        let forged = Arc::new(CertifiedKey::new(vec![victim.cert_der.clone()], key));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_client_cert_verifier(Arc::new(PinnedVerifier {
                pinned: vec![c.fingerprint],
                reload: None,
                algorithms: provider.signature_verification_algorithms,
                peer_role: "client",
            }))
            .with_cert_resolver(Arc::new(Fixed(forged)));
        let (_srv, cli) = exchange(
            Arc::new(server),
            client_config(&c, vec![victim.fingerprint]).expect("client config"),
        );
        let cli = cli.err().expect("client must refuse a forged signature");
        assert!(cli.contains("BadSignature"), "{cli}");
        assert!(
            !cli.contains("does not trust"),
            "pinning passed, signature must fail: {cli}"
        );
    }

    /// The same handshake through tokio-rustls, as the network code will use it.
    #[test]
    fn identity_tls13_handshake_with_tokio() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (s, c) = (new_identity("s"), new_identity("c"));
            let acceptor = tokio_rustls::TlsAcceptor::from(
                server_config(&s, vec![c.fingerprint]).expect("server config"),
            );
            let connector = tokio_rustls::TlsConnector::from(
                client_config(&c, vec![s.fingerprint]).expect("client config"),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = tokio::spawn(async move {
                let (sock, _) = listener.accept().await.expect("accept");
                let mut tls = acceptor.accept(sock).await.expect("server handshake");
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.expect("server read");
                tls.write_all(b"pong").await.expect("server write");
                tls.shutdown().await.expect("server shutdown");
                let (_, conn) = tls.get_ref();
                (buf, peer_fingerprint(conn), conn.protocol_version())
            });
            let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut tls = connector
                .connect(server_name(), sock)
                .await
                .expect("client handshake");
            tls.write_all(b"ping").await.expect("client write");
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf))
                .await
                .expect("timely")
                .expect("client read");
            assert_eq!(buf, b"pong");
            assert_eq!(peer_fingerprint(tls.get_ref().1), Some(s.fingerprint));
            let (got, peer, version) = server.await.expect("server task");
            assert_eq!(&got, b"ping");
            assert_eq!(peer, Some(c.fingerprint));
            assert_eq!(version, Some(ProtocolVersion::TLSv1_3));
        });
    }
}
