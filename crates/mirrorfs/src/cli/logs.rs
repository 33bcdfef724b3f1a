//! Where and how mirrorfs logs: to stderr, as other Linux daemons do.
//!
//! - **What is logged**: `MIRRORFS_LOG` if set, else `RUST_LOG`, else `info`; both take
//!   tracing's filter syntax (`debug`, `mirrorfs=debug`, `warn,mirrorfs::net=trace`). A filter
//!   that does not parse is reported once and `info` is used.
//! - **On a terminal**: a time, the level and the message, with colour unless `NO_COLOR` is set
//!   (<https://no-color.org>).
//! - **Into a file or a pipe**: the same without colour codes.
//! - **Under systemd** (stderr is the stream named by `JOURNAL_STREAM`): no time (journald adds
//!   its own) and a `<N>` priority prefix per line (sd-daemon(3)), so `journalctl -p warning`
//!   selects mirrorfs's warnings.

use std::fmt;
use std::io::IsTerminal as _;
use std::os::unix::fs::MetadataExt as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The variable that chooses what mirrorfs logs; it takes precedence over `RUST_LOG`.
pub const LOG_ENV: &str = "MIRRORFS_LOG";

/// How the lines look, chosen from where stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A terminal: time, level, message, in colour.
    Terminal,
    /// A file or a pipe: the same without colour codes.
    Plain,
    /// The journal: `<N>` priority prefixes, no time.
    Journal,
}

/// The style for this process's stderr and environment.
pub fn style() -> Style {
    if stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref()) {
        Style::Journal
    } else if std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    {
        Style::Terminal
    } else {
        Style::Plain
    }
}

/// Whether stderr is the journal stream systemd named in `JOURNAL_STREAM` (`DEVICE:INODE`):
/// the variable is inherited by children whose stderr goes elsewhere, so it alone is not enough
/// (systemd.exec(5)).
fn stderr_is_journal(var: Option<&str>) -> bool {
    let Some((dev, ino)) = var.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(md) => md.dev() == dev && md.ino() == ino,
        Err(_) => false,
    }
}

/// The filter from `MIRRORFS_LOG`, else `RUST_LOG`, else `info`; with a note when the variable
/// set could not be parsed.
fn filter() -> (EnvFilter, Option<String>) {
    for var in [LOG_ENV, "RUST_LOG"] {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => {
                return match EnvFilter::try_new(&v) {
                    Ok(f) => (f, None),
                    Err(e) => (
                        EnvFilter::new("info"),
                        Some(format!(
                            "{var}={v:?} is not a log filter ({e}); logging at info. Examples: {var}=debug, {var}=warn,mirrorfs::net=debug"
                        )),
                    ),
                };
            }
            _ => {}
        }
    }
    (EnvFilter::new("info"), None)
}

/// Sets up logging to stderr for the whole process (once, before anything logs).
pub fn init() {
    let (filter, note) = filter();
    let base = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match style() {
        Style::Terminal => base.with_ansi(true).init(),
        Style::Plain => base.with_ansi(false).init(),
        Style::Journal => base.with_ansi(false).event_format(Journal).init(),
    }
    if let Some(n) = note {
        tracing::warn!("{n}");
    }
}

/// One journal line per event: `<N>` (the syslog priority of the level), then the message and
/// any fields, nothing else.
struct Journal;

/// The syslog priority (sd-daemon(3)) of a tracing level.
fn priority(l: Level) -> u8 {
    match l {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(w, "<{}>", priority(*event.metadata().level()))?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_syslogs() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(Some("1:2")));
        let md = std::fs::metadata("/proc/self/fd/2").expect("stderr");
        let v = format!("{}:{}", md.dev(), md.ino());
        assert!(stderr_is_journal(Some(&v)));
    }
}
