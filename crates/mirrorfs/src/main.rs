//! mirrorfs: a FUSE file system that mirrors every change of a directory, in order, to mirrors.
//!
//! The folders follow the data flow (see docs/ARCHITECTURE.md): the FUSE shell (`fuse`) → the site
//! (`site`: order lock and journal, its files and state) → mirror workers (`mirror`) → trees on disk
//! (`tree`) and the transport to a peer site (`net`); `cli` wires them together for each command,
//! `sys` wraps the system calls. This file only parses the command line.

mod cli;
mod fuse;
mod mirror;
mod net;
mod readiness;
#[cfg(test)]
mod readme_check;
mod site;
mod sys;
mod trace;
mod tree;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use crate::net::{identity, serve};
use crate::site::status;

#[derive(Parser)]
#[command(
    name = "mirrorfs",
    version,
    about = "A real-time mirroring file system: mount it over a directory and every change is journaled and applied, in order, to one or more mirror directories."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount BACKING at MOUNTPOINT and mirror every change to each --mirror (runs in the foreground;
    /// Ctrl-C or SIGTERM unmounts cleanly).
    Mount(Box<cli::mount::MountArgs>),
    /// Show each mirror's state, applied position and lag, and the journal's size.
    Status {
        /// The mountpoint (default: every mirrorfs mount on this machine).
        mountpoint: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A self-contained demonstration on temporary directories: mount, write, watch the mirror
    /// catch up, show status, unmount.
    Demo,
    /// Create this machine's identity (a key pair for the replication link) if it has none, and
    /// print its fingerprint: give it to the peers with `mirrorfs trust`.
    Init {
        /// Configuration directory (default: $MIRRORFS_CONFIG or /etc/mirrorfs).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A name for this machine, recorded in its certificate.
        #[arg(long)]
        name: Option<String>,
    },
    /// Trust a peer's key: primaries trust their mirrors, mirrors trust their primaries.
    Trust {
        /// The peer's fingerprint, as `mirrorfs init` printed it there (blake3:...).
        fingerprint: String,
        /// A name to remember the peer by.
        #[arg(default_value = "peer")]
        name: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a mirror daemon: receive a primary's changes over the network and apply them to DIR.
    Serve(serve::ServeArgs),
    /// Run a witness: a small daemon that stores no data and grants each volume's write lease to
    /// one site at a time, so that with `mount --witness` and `promote --witness` at most one
    /// site writes (the side of a split that cannot reach the witness goes read-only, EROFS).
    Witness(crate::net::witness::WitnessArgs),
    /// Turn a mirror's copy into a primary at its last applied state (the daemon must be
    /// stopped). The old primary can then only return as a mirror of this one.
    Promote {
        /// The mirror directory.
        dir: PathBuf,
        /// Its state directory (default: DIR/.mirrorfs).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Promote even if a daemon still holds DIR or the copy is not consistent.
        #[arg(long)]
        force: bool,
        /// A witness (`mirror://HOST:PORT`, a `mirrorfs witness`): take the write lease for the
        /// new generation first; refused while the old primary's lease runs (it is alive on the
        /// other side of a split). Mount the promoted copy with the same `--witness`.
        #[arg(long)]
        witness: Option<String>,
        /// The lease's length in ms asked of the witness.
        #[arg(long, default_value_t = 3000)]
        lease_ms: u64,
        /// Configuration directory with this machine's identity and trusted peers (default:
        /// $MIRRORFS_CONFIG or /etc/mirrorfs).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List the conflicts a reintegration left after a failover (both versions kept: ours at
    /// PATH, theirs as PATH.conflict-SITE-YYYYMMDD-HHMMSS), or settle one with `resolve`.
    Conflicts(cli::conflicts::ConflictsArgs),
    /// Group changes so that every mirror shows all of them or none (group-atomic mirroring):
    /// `group begin MOUNT`, change files, `group end MOUNT`. The same as setting the mount
    /// root's attribute user.mirrorfs.group to begin / end (setfattr), which scripts may use.
    Group(cli::group::GroupArgs),
    /// The config file (/etc/mirrorfs/mirrorfs.toml, volumes.d/NAME.toml): `config check`
    /// validates it, `config show NAME` prints a volume's settings. `mount --volume NAME` and
    /// `serve --volume NAME` use it.
    Config(cli::config::ConfigArgs),
    /// Print a shell completion script: `mirrorfs completion bash >
    /// /usr/share/bash-completion/completions/mirrorfs` (zsh: a `_mirrorfs` file in $fpath;
    /// fish: ~/.config/fish/completions/mirrorfs.fish).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (mirrorfs.1 and one per subcommand: mirrorfs-mount.1, ...) into DIR.
    Man {
        /// The directory to write them to (created if needed).
        dir: PathBuf,
    },
    /// Compare each local mirror (or a named network mirror) of a running mount with the primary (content by blake3, type,
    /// mode, owner, mtime, links, symlink targets, xattrs, holes) and list the differences;
    /// `--repair` mends them through the journal. Exit status: 0 equal, 3 differences found
    /// (or left after --repair), 1 error. Files unchanged since the last verify are not read
    /// again (a hash cache in the state directory). A network mirror named with `--mirror
    /// mirror://HOST:PORT` is scanned by its daemon, which sends only hashes.
    Verify(cli::verify::VerifyArgs),
    /// Resync a mirror of a running mount (a local one, or a network one named
    /// mirror://HOST:PORT) through the journal (only what differs is copied, the primary's
    /// holes kept; what only the mirror has is kept unless --delete-extra), and wait until it
    /// is applied.
    Resync(cli::resync::ResyncArgs),
}

fn main() {
    cli::logs::init();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `mount -t fuse.mirrorfs` and fstab lines run this binary as a mount helper.
    if cli::helper::invoked_as_helper(&args, &Cli::command()) {
        std::process::exit(cli::helper::run(&args, &Cli::command()));
    }
    // `mount --volume NAME` / `serve --volume NAME`: the config file's settings become flags
    // that the command line's own override.
    let cli = match cli::config::expand(args) {
        Ok(argv) => Cli::parse_from(argv),
        Err(e) => {
            eprintln!("mirrorfs: error: {e:#}");
            std::process::exit(1);
        }
    };
    if !matches!(cli.cmd, Cmd::Mount(_) | Cmd::Serve(_) | Cmd::Witness(_)) {
        // A command that prints (`status | head -1`) ends quietly when its reader goes away, as
        // other Unix tools do; the long-running ones keep SIGPIPE ignored (sockets report EPIPE).
        // SAFETY: restoring the default disposition of one signal, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let r = match cli.cmd {
        Cmd::Mount(a) => cli::mount::mount(*a),
        Cmd::Status { mountpoint, json } => status::show(mountpoint.as_deref(), json),
        Cmd::Demo => cli::demo::demo(),
        Cmd::Init { config, name } => init(config.as_deref(), name),
        Cmd::Trust {
            fingerprint,
            name,
            config,
        } => trust(config.as_deref(), &fingerprint, &name),
        Cmd::Serve(a) => serve::serve(a),
        Cmd::Witness(a) => crate::net::witness::witness(a),
        Cmd::Promote {
            dir,
            state,
            force,
            witness,
            lease_ms,
            config,
        } => {
            // The lease is taken through the network layer, which the site layer below it does
            // not know: handed down as a function.
            let take = |r: &mirrorfs_core::lease::Request| {
                net::witness::acquire(witness.as_deref().unwrap_or_default(), config.as_deref(), r)
            };
            let lease = witness.is_some().then_some(lease_ms);
            site::promote::promote(
                &dir,
                state.as_deref(),
                force,
                lease.map(|ms| (ms, &take as _)),
            )
        }
        Cmd::Conflicts(a) => cli::conflicts::conflicts(a),
        Cmd::Group(a) => cli::group::group(a),
        Cmd::Config(a) => cli::config::config(a),
        Cmd::Completion { shell } => cli::gen::completion(Cli::command(), shell),
        Cmd::Man { dir } => cli::gen::man(Cli::command(), &dir),
        Cmd::Verify(a) => cli::verify::verify(a),
        Cmd::Resync(a) => cli::resync::resync(a),
    };
    if let Err(e) = r {
        eprintln!("mirrorfs: error: {e:#}");
        std::process::exit(1);
    }
}

fn init(config: Option<&Path>, name: Option<String>) -> Result<()> {
    let dir = identity::config_dir(config);
    let existed = dir.join(identity::IDENTITY_FILE).exists();
    let id = identity::init(&dir, &name.unwrap_or_else(cli::hostname))?;
    println!(
        "{} identity in {}\nfingerprint: {}\n\ngive this fingerprint to each peer: on it, run\n  mirrorfs trust {} NAME",
        if existed { "existing" } else { "created a new" },
        dir.display(),
        id.fingerprint,
        id.fingerprint
    );
    Ok(())
}

fn trust(config: Option<&Path>, fp: &str, name: &str) -> Result<()> {
    let dir = identity::config_dir(config);
    let fp: identity::Fingerprint = fp.parse()?;
    if identity::trust(&dir, &fp, name)? {
        println!(
            "now trusting {fp} ({name}) in {}",
            dir.join("peers").display()
        );
    } else {
        println!("{fp} was already trusted");
    }
    Ok(())
}
