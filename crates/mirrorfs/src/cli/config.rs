//! The config file: `/etc/mirrorfs/mirrorfs.toml` (or `$MIRRORFS_CONFIG/mirrorfs.toml`) and one
//! file per volume in `volumes.d/`, read by `mirrorfs mount --volume NAME` and
//! `mirrorfs serve --volume NAME`, checked by `mirrorfs config check`, shown by
//! `mirrorfs config show`.
//!
//! ```toml
//! [volume.data]                # `mirrorfs mount --volume data`
//! backing = "/srv/data"
//! mountpoint = "/mnt/data"
//! mirror = ["/backup/data", "mirror://backup1:7070"]
//! ack = "durable"
//!
//! [serve.data]                 # `mirrorfs serve --volume data`
//! dir = "/backup/data"
//! listen = "0.0.0.0:7070"
//! ```
//!
//! `volumes.d/NAME.toml` (or `serve.d/NAME.toml`) holds the keys of one volume (daemon) without
//! a section header. The keys are the flags of `mirrorfs mount` (`serve`), with `_` or `-`
//! between words, and the positional arguments by name (`backing`, `mountpoint`; `dir`): the
//! keys are taken from the commands' own definitions, so every flag has its key. Flags given
//! on the command line override the file's values (a list such as `mirror` is replaced, not
//! extended); a switch the file sets to `true` is turned off by its hidden negation
//! (`--no-compress`; `--udp` for `no_udp`), which also drops the file's settings that need the
//! switch (`fsync_group_max_ms`).

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Arg, ArgAction, Args as _, Command};
use toml_edit::{Item, TableLike, Value};

use crate::net::identity;

/// The main config file's name inside the config directory.
pub const MAIN_FILE: &str = "mirrorfs.toml";

/// What a config entry configures: a mounted volume or a mirror daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mount,
    Serve,
}

impl Kind {
    /// The subcommand the entry's keys are the flags of.
    pub fn command(self) -> &'static str {
        match self {
            Kind::Mount => "mount",
            Kind::Serve => "serve",
        }
    }

    /// The section of `mirrorfs.toml` (`[volume.NAME]`, `[serve.NAME]`).
    fn section(self) -> &'static str {
        match self {
            Kind::Mount => "volume",
            Kind::Serve => "serve",
        }
    }

    /// The directory of one file per entry.
    fn dir(self) -> &'static str {
        match self {
            Kind::Mount => "volumes.d",
            Kind::Serve => "serve.d",
        }
    }

    /// The clap definition of the subcommand, the source of the keys.
    fn clap(self) -> Command {
        match self {
            Kind::Mount => crate::cli::mount::MountArgs::augment_args(Command::new("mount")),
            Kind::Serve => crate::net::serve::ServeArgs::augment_args(Command::new("serve")),
        }
    }
}

/// A problem in a config file, where it is and how to fix it.
#[derive(Debug, Clone)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is the file as a whole.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

/// One key of an entry, as command-line arguments.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The clap argument it sets.
    pub id: String,
    /// The values, already checked by the flag's own parser (empty for a flag set to `false`).
    pub values: Vec<String>,
    /// A flag without a value (`compress = true`).
    pub switch: bool,
    pub line: usize,
}

/// A volume (`[volume.NAME]`) or a daemon (`[serve.NAME]`) of the config.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    pub name: String,
    pub file: PathBuf,
    pub line: usize,
    pub settings: Vec<Setting>,
}

/// The config key of a clap argument: the long flag with `_` between words, else its id.
fn key_of(a: &Arg) -> String {
    match a.get_long() {
        Some(l) if !a.is_positional() => l.replace('-', "_"),
        _ => a.get_id().as_str().to_string(),
    }
}

/// The arguments a config may set (not `--volume`, `--help`, `--version`, nor hidden ones).
fn settable(cmd: &Command) -> Vec<&Arg> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
        .filter(|a| a.get_id() != "volume")
        .collect()
}

/// 1-based line of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The known key closest to `unknown`, if one is close enough to be a likely typo.
fn closest<'a>(unknown: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (strsim::jaro_winkler(unknown, k), k))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Reads one entry's keys from `table` (in `text`, the file's contents).
fn read_entry(
    kind: Kind,
    name: &str,
    file: &Path,
    text: &str,
    line: usize,
    table: &dyn TableLike,
    problems: &mut Vec<Problem>,
) -> Entry {
    let cmd = kind.clap();
    let args = settable(&cmd);
    let mut settings: Vec<Setting> = Vec::new();
    for (raw_key, item) in table.iter() {
        let key_line = table
            .get_key_value(raw_key)
            .and_then(|(k, _)| k.span())
            .map_or(line, |s| line_at(text, s.start));
        let mut problem = |message: String| {
            problems.push(Problem {
                file: file.to_path_buf(),
                line: key_line,
                message,
            })
        };
        let key = raw_key.replace('-', "_");
        let Some(arg) = args.iter().find(|a| key_of(a) == key) else {
            let hint = closest(&key, args.iter().map(|a| a.get_id().as_str()))
                .and_then(|id| args.iter().find(|a| a.get_id() == id))
                .map(|a| key_of(a))
                .or_else(|| {
                    let keys: Vec<String> = args.iter().map(|a| key_of(a)).collect();
                    closest(&key, keys.iter().map(String::as_str)).map(str::to_string)
                });
            problem(match hint {
                Some(h) => format!(
                    "unknown key `{raw_key}` for {} `{name}`; did you mean `{h}`?",
                    what(kind)
                ),
                None => format!(
                    "unknown key `{raw_key}` for {} `{name}`: the keys are the flags of `mirrorfs {} --help` ({})",
                    what(kind),
                    kind.command(),
                    args.iter().map(|a| key_of(a)).collect::<Vec<_>>().join(", ")
                ),
            });
            continue;
        };
        if settings.iter().any(|s| s.id == arg.get_id().as_str()) {
            problem(format!(
                "`{raw_key}` is set twice for {} `{name}`: remove one",
                what(kind)
            ));
            continue;
        }
        match values_of(arg, &key, item) {
            Ok((values, switch)) => settings.push(Setting {
                id: arg.get_id().as_str().to_string(),
                values,
                switch,
                line: key_line,
            }),
            Err(m) => problem(m),
        }
    }
    for a in &args {
        if a.is_required_set() && !settings.iter().any(|s| s.id == a.get_id().as_str()) {
            let k = key_of(a);
            problems.push(Problem {
                file: file.to_path_buf(),
                line,
                message: format!(
                    "{} `{name}` has no `{k}`: add `{k} = {}` (or give it on the command line)",
                    what(kind),
                    example(&k)
                ),
            });
        }
    }
    Entry {
        kind,
        name: name.to_string(),
        file: file.to_path_buf(),
        line,
        settings,
    }
}

/// "a volume" or "a mirror daemon", for messages.
fn what(kind: Kind) -> &'static str {
    match kind {
        Kind::Mount => "volume",
        Kind::Serve => "mirror daemon",
    }
}

/// An example value for a required key, for the fix a message suggests.
fn example(key: &str) -> &'static str {
    match key {
        "backing" => "\"/srv/data\"",
        "mountpoint" => "\"/mnt/data\"",
        "mirror" => "[\"/backup/data\"]",
        "dir" => "\"/backup/data\"",
        "listen" => "\"0.0.0.0:7070\"",
        _ => "\"...\"",
    }
}

/// The command-line values of one key, checked by the flag's own parser; and whether the flag
/// is a switch. The error says what the key takes.
fn values_of(
    arg: &Arg,
    key: &str,
    item: &Item,
) -> std::result::Result<(Vec<String>, bool), String> {
    let Some(v) = item.as_value() else {
        return Err(format!(
            "`{key}` must be a value, not a table: write `{key} = ...`"
        ));
    };
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return match v.as_bool() {
            Some(true) => Ok((Vec::new(), true)),
            Some(false) => Ok((Vec::new(), false)),
            None => Err(format!(
                "`{key}` takes true or false, not {}: write `{key} = true`",
                shown(v)
            )),
        };
    }
    let many = matches!(arg.get_action(), ArgAction::Append);
    let raw: Vec<&Value> = match v.as_array() {
        Some(arr) if many => arr.iter().collect(),
        Some(_) => {
            return Err(format!(
                "`{key}` takes one value, not a list: write `{key} = {}`",
                example(key)
            ))
        }
        None => vec![v],
    };
    let mut out = Vec::new();
    for r in raw {
        let s = match r {
            Value::String(s) => s.value().clone(),
            Value::Integer(i) => i.value().to_string(),
            Value::Float(f) => f.value().to_string(),
            Value::Boolean(b) => b.value().to_string(),
            other => {
                return Err(format!(
                    "`{key}` takes {}, not {}",
                    if many {
                        "a string or a list of strings"
                    } else {
                        "a string or a number"
                    },
                    shown(other)
                ))
            }
        };
        // The flag's own parser, alone in a command of its own (the flag's relations to other
        // flags are the full command line's business).
        let alone = Command::new("mirrorfs-config").no_binary_name(true).arg(
            Arg::new("v")
                .long("v")
                .action(ArgAction::Set)
                .value_parser(arg.get_value_parser().clone()),
        );
        if let Err(e) = alone.try_get_matches_from([OsStr::new("--v"), OsStr::new(&s)]) {
            let possible: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|p| p.get_name().to_string())
                .collect();
            let why = clap_reason(&e);
            return Err(if possible.is_empty() {
                format!("`{key} = {}` is not valid: {why}", shown(r))
            } else {
                format!(
                    "`{key} = {}` is not valid: write one of {}",
                    shown(r),
                    possible
                        .iter()
                        .map(|p| format!("\"{p}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        }
        out.push(s);
    }
    Ok((out, false))
}

/// A value as the file wrote it, for messages.
fn shown(v: &Value) -> String {
    v.to_string().trim().to_string()
}

/// The reason in one of clap's value errors, without its `error:` and usage lines.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let first = first.trim_start_matches("error: ").trim();
    match first.split_once(">': ") {
        Some((_, why)) => why.to_string(),
        None => first.to_string(),
    }
}

/// Reads one file: `mirrorfs.toml` (sections) when `single` is `None`, else the one entry of a
/// `volumes.d/NAME.toml` (`serve.d/NAME.toml`) file.
fn read_file(
    path: &Path,
    single: Option<(Kind, &str)>,
    entries: &mut Vec<Entry>,
    problems: &mut Vec<Problem>,
) {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.push(Problem {
                file: path.to_path_buf(),
                line: 0,
                message: format!("cannot read it: {e}"),
            });
            return;
        }
    };
    let doc = match toml_edit::Document::parse(text.as_str()) {
        Ok(d) => d,
        Err(e) => {
            problems.push(Problem {
                file: path.to_path_buf(),
                line: e.span().map_or(0, |s| line_at(&text, s.start)),
                message: format!(
                    "not valid TOML: {} (keys are written `key = \"value\"`, sections `[volume.NAME]`)",
                    e.message().trim()
                ),
            });
            return;
        }
    };
    let root = doc.as_table();
    if let Some((kind, name)) = single {
        entries.push(read_entry(kind, name, path, &text, 1, root, problems));
        return;
    }
    for (top, item) in root.iter() {
        let line = root
            .get_key_value(top)
            .and_then(|(k, _)| k.span())
            .map_or(1, |s| line_at(&text, s.start));
        let kind = match top {
            "volume" => Kind::Mount,
            "serve" => Kind::Serve,
            other => {
                let hint = closest(other, ["volume", "serve"].into_iter())
                    .map(|h| format!("did you mean `[{h}.NAME]`?"))
                    .unwrap_or_else(|| {
                        "the sections are `[volume.NAME]` (for `mirrorfs mount --volume NAME`) and `[serve.NAME]` (for `mirrorfs serve --volume NAME`)".into()
                    });
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line,
                    message: format!("unknown section or key `{other}`: {hint}"),
                });
                continue;
            }
        };
        let Some(t) = item.as_table_like() else {
            problems.push(Problem {
                file: path.to_path_buf(),
                line,
                message: format!("`{top}` must hold sections: write `[{top}.NAME]`"),
            });
            continue;
        };
        for (name, item) in t.iter() {
            let line = t
                .get_key_value(name)
                .and_then(|(k, _)| k.span())
                .map_or(line, |s| line_at(&text, s.start));
            match item.as_table_like() {
                Some(vt) => entries.push(read_entry(kind, name, path, &text, line, vt, problems)),
                None => problems.push(Problem {
                    file: path.to_path_buf(),
                    line,
                    message: format!(
                        "`{top}.{name}` must be a section: write `[{top}.{name}]` and its keys below it"
                    ),
                }),
            }
        }
    }
}

/// Every entry of the config directory `dir`, and every problem found in its files.
pub fn load(dir: &Path) -> (Vec<Entry>, Vec<Problem>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let main = dir.join(MAIN_FILE);
    if main.exists() {
        read_file(&main, None, &mut entries, &mut problems);
    }
    for kind in [Kind::Mount, Kind::Serve] {
        let d = dir.join(kind.dir());
        let Ok(rd) = fs::read_dir(&d) else { continue };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension() == Some(OsStr::new("toml")))
            .collect();
        files.sort();
        for f in files {
            let name = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            read_file(&f, Some((kind, &name)), &mut entries, &mut problems);
        }
    }
    let mut seen: Vec<&Entry> = Vec::new();
    for e in &entries {
        if let Some(first) = seen.iter().find(|s| s.kind == e.kind && s.name == e.name) {
            problems.push(Problem {
                file: e.file.clone(),
                line: e.line,
                message: format!(
                    "{} `{}` is also defined at {}:{}: keep one",
                    what(e.kind),
                    e.name,
                    first.file.display(),
                    first.line
                ),
            });
        } else {
            seen.push(e);
        }
    }
    (entries, problems)
}

/// What the command line of `mount`/`serve` gave: the ids of the flags, the positionals, the
/// `--volume` and `--config` values.
struct Given {
    /// The flags it sets; a switch it turns off (`--no-compress`) counts as set.
    ids: BTreeSet<String>,
    /// The switches it turns off (ids of the switches, not of their negations).
    negated: BTreeSet<String>,
    positionals: usize,
    volume: Option<String>,
    config: Option<PathBuf>,
}

/// The hidden flag that turns switch `a` off (`--no-compress` for `--compress`, `--udp` for
/// `--no-udp`), if it has one: a config file's `true` is turned off on the command line by it.
pub(crate) fn negation<'a>(cmd: &'a Command, a: &Arg) -> Option<&'a Arg> {
    if !matches!(a.get_action(), ArgAction::SetTrue) || a.is_hide_set() {
        return None;
    }
    let long = a.get_long()?;
    let other = match long.strip_prefix("no-") {
        Some(rest) => rest.to_string(),
        None => format!("no-{long}"),
    };
    cmd.get_arguments().find(|n| {
        n.is_hide_set()
            && n.get_long() == Some(other.as_str())
            && matches!(n.get_action(), ArgAction::SetTrue)
    })
}

/// The switch that `n` turns off, if `n` is a negation.
fn negated_by<'a>(cmd: &'a Command, n: &Arg) -> Option<&'a Arg> {
    cmd.get_arguments()
        .find(|a| negation(cmd, a).is_some_and(|x| x.get_id() == n.get_id()))
}

/// Whether flag `flag` with `values` is only valid together with switch `switch` (clap's
/// `requires`, e.g. `--fsync-group-max-ms` with `--fsync-groups`): asked of clap itself, which
/// does not show an argument's requirements otherwise.
fn requires(cmd: &Command, flag: &str, values: &[String], switch: &str) -> bool {
    let loose = cmd
        .clone()
        .no_binary_name(true)
        .mut_args(|a| a.required(false));
    let mut line: Vec<String> = values
        .iter()
        .flat_map(|v| [flag.to_string(), v.clone()])
        .collect();
    let alone = loose.clone().try_get_matches_from(&line);
    line.push(switch.to_string());
    let with = loose.try_get_matches_from(&line);
    matches!(alone, Err(e) if e.kind() == clap::error::ErrorKind::MissingRequiredArgument)
        && with.is_ok()
}

/// Reads the arguments after `mount`/`serve` as clap will, to learn which flags they set.
fn given(cmd: &Command, tail: &[OsString]) -> Given {
    let mut g = Given {
        ids: BTreeSet::new(),
        negated: BTreeSet::new(),
        positionals: 0,
        volume: None,
        config: None,
    };
    let mut i = 0;
    let mut only_positionals = false;
    while i < tail.len() {
        let t = tail[i].to_string_lossy();
        i += 1;
        if only_positionals || !t.starts_with('-') || t == "-" {
            g.positionals += 1;
            continue;
        }
        if t == "--" {
            only_positionals = true;
            continue;
        }
        let (arg, inline) = if let Some(long) = t.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            (
                cmd.get_arguments().find(|a| a.get_long() == Some(name)),
                value,
            )
        } else {
            let mut chars = t.chars().skip(1);
            let c = chars.next();
            let rest: String = chars.collect();
            (
                cmd.get_arguments()
                    .find(|a| c.is_some() && a.get_short() == c),
                (!rest.is_empty()).then_some(rest),
            )
        };
        let Some(arg) = arg else { continue };
        let takes = arg.get_action().takes_values();
        let value = if takes && inline.is_none() {
            let v = tail.get(i).map(|v| v.to_string_lossy().into_owned());
            i += 1;
            v
        } else {
            inline
        };
        match arg.get_id().as_str() {
            "volume" => g.volume = value,
            "config" => g.config = value.map(PathBuf::from),
            _ => {}
        }
        if let Some(switch) = negated_by(cmd, arg) {
            g.ids.insert(switch.get_id().as_str().to_string());
            g.negated.insert(switch.get_id().as_str().to_string());
        }
        g.ids.insert(arg.get_id().as_str().to_string());
    }
    g
}

/// The command line with the settings of `--volume NAME` put in: the file's positionals (unless
/// the command line has its own) and its flags that the command line does not set. Any other
/// command line is returned as it is.
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let kind = match argv.get(1).and_then(|a| a.to_str()) {
        Some("mount") => Kind::Mount,
        Some("serve") => Kind::Serve,
        _ => return Ok(argv),
    };
    let cmd = kind.clap();
    let g = given(&cmd, &argv[2..]);
    let Some(name) = g.volume.clone() else {
        return Ok(argv);
    };
    let dir = identity::config_dir(g.config.as_deref());
    let (entries, problems) = load(&dir);
    let Some(entry) = entries.iter().find(|e| e.kind == kind && e.name == name) else {
        let names: Vec<&str> = entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.name.as_str())
            .collect();
        let mut msg = format!(
            "no {} `{name}` in {} ([{}.{name}]) or {}",
            what(kind),
            dir.join(MAIN_FILE).display(),
            kind.section(),
            dir.join(kind.dir()).join(format!("{name}.toml")).display()
        );
        if names.is_empty() {
            msg.push_str("; none is defined there (set $MIRRORFS_CONFIG or --config to use another directory)");
        } else {
            msg.push_str(&format!("; defined: {}", names.join(", ")));
        }
        for p in &problems {
            msg.push_str(&format!("\n  {p}"));
        }
        bail!(msg);
    };
    let own: Vec<&Problem> = problems.iter().filter(|p| p.file == entry.file).collect();
    if !own.is_empty() {
        let list: Vec<String> = own.iter().map(|p| format!("  {p}")).collect();
        bail!(
            "the config of {} `{name}` has errors (`mirrorfs config check` lists them all):\n{}",
            what(kind),
            list.join("\n")
        );
    }
    let mut out: Vec<OsString> = argv[..2].to_vec();
    let positionals: Vec<&Arg> = cmd.get_positionals().collect();
    if g.positionals == 0 {
        for p in &positionals {
            if let Some(s) = entry.settings.iter().find(|s| s.id == p.get_id().as_str()) {
                out.extend(s.values.iter().map(OsString::from));
            }
        }
    }
    for s in &entry.settings {
        if g.ids.contains(&s.id) || positionals.iter().any(|p| p.get_id() == s.id.as_str()) {
            continue;
        }
        let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == s.id.as_str()) else {
            continue;
        };
        let flag = match (arg.get_long(), arg.get_short()) {
            (Some(l), _) => format!("--{l}"),
            (None, Some(c)) => format!("-{c}"),
            (None, None) => continue,
        };
        // A switch the command line turns off takes the file's settings that need it along
        // (`--no-fsync-groups` over a file's `fsync_group_max_ms`).
        let needs_off = g.negated.iter().any(|off| {
            cmd.get_arguments()
                .find(|a| a.get_id() == off.as_str())
                .and_then(Arg::get_long)
                .is_some_and(|l| requires(&cmd, &flag, &s.values, &format!("--{l}")))
        });
        if needs_off {
            continue;
        }
        if s.switch {
            out.push(flag.into());
        } else {
            for v in &s.values {
                out.push(flag.clone().into());
                out.push(v.into());
            }
        }
    }
    // The file's flags first, the command line's after: a `--` there still ends the flags.
    out.extend(argv[2..].iter().cloned());
    Ok(out)
}

/// `mirrorfs config`.
#[derive(clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    cmd: ConfigCmd,
}

#[derive(clap::Subcommand)]
enum ConfigCmd {
    /// Check the config: every file of the config directory ($MIRRORFS_CONFIG or /etc/mirrorfs:
    /// mirrorfs.toml, volumes.d/*.toml, serve.d/*.toml), or only FILE. Each error names the file,
    /// the line and the fix; the exit status is 1 if there is one.
    Check {
        /// One file to check (a mirrorfs.toml, or a volumes.d/NAME.toml).
        file: Option<PathBuf>,
        /// The config directory (default: $MIRRORFS_CONFIG or /etc/mirrorfs).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the settings a volume (`mount --volume NAME`) or a mirror daemon
    /// (`serve --volume NAME`) gets: each key with its value and where it comes from (a file's
    /// line, or the default), and the command line they make.
    Show {
        name: String,
        /// The config directory (default: $MIRRORFS_CONFIG or /etc/mirrorfs).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `mirrorfs config check|show`.
pub fn config(a: ConfigArgs) -> Result<()> {
    match a.cmd {
        ConfigCmd::Check { file, config } => check(file.as_deref(), config.as_deref()),
        ConfigCmd::Show { name, config } => show(&name, config.as_deref()),
    }
}

fn check(file: Option<&Path>, config: Option<&Path>) -> Result<()> {
    let (entries, problems, what_checked) = match file {
        Some(f) => {
            let mut entries = Vec::new();
            let mut problems = Vec::new();
            let parent = f
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str());
            let name = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let single = match parent {
                Some("volumes.d") => Some((Kind::Mount, name.as_str())),
                Some("serve.d") => Some((Kind::Serve, name.as_str())),
                _ => None,
            };
            read_file(f, single, &mut entries, &mut problems);
            (entries, problems, f.display().to_string())
        }
        None => {
            let dir = identity::config_dir(config);
            if !dir.is_dir() {
                bail!(
                    "{} does not exist: create it with `mirrorfs init` and write {MAIN_FILE} there (see the README's config section)",
                    dir.display()
                );
            }
            let (e, mut p) = load(&dir);
            if dir.join(identity::PEERS_FILE).exists() {
                if let Err(err) = identity::peers(&dir) {
                    p.push(Problem {
                        file: dir.join(identity::PEERS_FILE),
                        line: 0,
                        message: format!("{err:#}"),
                    });
                }
            }
            (e, p, dir.display().to_string())
        }
    };
    for p in &problems {
        println!("{p}");
    }
    let volumes = entries.iter().filter(|e| e.kind == Kind::Mount).count();
    let daemons = entries.len() - volumes;
    if problems.is_empty() {
        println!("{what_checked}: ok, {volumes} volume(s), {daemons} mirror daemon(s)");
        Ok(())
    } else {
        bail!(
            "{what_checked}: {} error(s) in the config (listed above)",
            problems.len()
        )
    }
}

fn show(name: &str, config: Option<&Path>) -> Result<()> {
    let dir = identity::config_dir(config);
    let (entries, problems) = load(&dir);
    let found: Vec<&Entry> = entries.iter().filter(|e| e.name == name).collect();
    if found.is_empty() {
        bail!(
            "no volume or mirror daemon `{name}` in {}: define `[volume.{name}]` or `[serve.{name}]` in {MAIN_FILE}, or write volumes.d/{name}.toml",
            dir.display()
        );
    }
    for p in problems
        .iter()
        .filter(|p| found.iter().any(|e| e.file == p.file))
    {
        println!("# error: {p}");
    }
    for e in found {
        print_entry(e);
    }
    Ok(())
}

/// One entry as TOML with each key's origin, then the command line it makes.
fn print_entry(e: &Entry) {
    let cmd = e.kind.clap();
    println!(
        "# {} `{}` ({}:{}): `mirrorfs {} --volume {}`",
        what(e.kind),
        e.name,
        e.file.display(),
        e.line,
        e.kind.command(),
        e.name
    );
    println!("[{}.{}]", e.kind.section(), e.name);
    let origin = |l: usize| format!("{}:{l}", e.file.display());
    for a in settable(&cmd) {
        let key = key_of(a);
        let set = e.settings.iter().find(|s| s.id == a.get_id().as_str());
        let (value, from) = match set {
            Some(s) if s.switch => ("true".to_string(), origin(s.line)),
            Some(s) if s.values.is_empty() => ("false".to_string(), origin(s.line)),
            Some(s) => (toml_value(a, &s.values), origin(s.line)),
            None => {
                let d: Vec<String> = a
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                if matches!(a.get_action(), ArgAction::SetTrue) {
                    ("false".into(), "default".into())
                } else if d.is_empty() {
                    (String::new(), "not set".into())
                } else {
                    (toml_value(a, &d), "default".into())
                }
            }
        };
        if value.is_empty() {
            let line = format!("# {key} = ...");
            println!("{line:<40} # {from}");
        } else {
            let line = format!("{key} = {value}");
            println!("{line:<40} # {from}");
        }
    }
}

/// Values as a TOML value: a number as it is, a list for a flag that repeats, else a string.
fn toml_value(a: &Arg, values: &[String]) -> String {
    let one = |v: &String| {
        if v.parse::<i64>().is_ok() {
            v.clone()
        } else {
            Value::from(v.as_str()).to_string().trim().to_string()
        }
    };
    if matches!(a.get_action(), ArgAction::Append) {
        format!(
            "[{}]",
            values.iter().map(one).collect::<Vec<_>>().join(", ")
        )
    } else {
        values.first().map(one).unwrap_or_default()
    }
}

/// Every key of `mount` (`serve`), its meaning and default, as a Markdown table (for the
/// README, kept equal to it by a test).
#[cfg(test)]
pub fn keys_markdown(kind: Kind) -> String {
    let cmd = kind.clap();
    let mut out = String::from("| key | meaning | default |\n| --- | --- | --- |\n");
    for a in settable(&cmd) {
        let help = a
            .get_help()
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('\n', " ")
            .replace('|', "\\|");
        // The first sentence: up to a ". " that does not end an "e.g." or an "i.e.".
        let end = help
            .match_indices(". ")
            .map(|(i, _)| i)
            .find(|&i| !help[..i].ends_with("e.g") && !help[..i].ends_with("i.e"))
            .unwrap_or(help.len());
        let first = help[..end].trim_end_matches('.');
        let d: Vec<String> = a
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if matches!(a.get_action(), ArgAction::SetTrue) {
            "false".to_string()
        } else if d.is_empty() {
            if a.is_required_set() {
                "required".to_string()
            } else {
                "—".to_string()
            }
        } else {
            toml_value(a, &d)
        };
        out.push_str(&format!(
            "| `{}` | {first}. | {} |\n",
            key_of(a),
            default.replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, text).expect("write");
        p
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_volume_expands_and_the_command_line_wins() {
        let d = tempfile::tempdir().expect("tmp");
        write(
            d.path(),
            MAIN_FILE,
            "[volume.data]\nbacking = \"/srv/a\"\nmountpoint = \"/mnt/a\"\nmirror = [\"/b1\", \"/b2\"]\nack = \"durable\"\ncompress = true\nfsync-waits = \"quorum\"\n",
        );
        let cfg = d.path().to_string_lossy().into_owned();
        let out = expand(os(&[
            "mirrorfs", "mount", "--volume", "data", "--config", &cfg, "--ack", "local",
        ]))
        .expect("expands");
        let s: Vec<String> = out
            .iter()
            .map(|o| o.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&s[..4], &["mirrorfs", "mount", "/srv/a", "/mnt/a"]);
        assert!(s.windows(2).any(|w| w == ["--mirror", "/b2"]));
        assert!(s.windows(2).any(|w| w == ["--fsync-waits", "quorum"]));
        assert!(s.contains(&"--compress".to_string()));
        assert!(!s.contains(&"durable".to_string()), "{s:?}");
        assert!(s.windows(2).any(|w| w == ["--ack", "local"]));
    }

    /// The flags of an expanded command line, as clap reads them.
    fn parsed(kind: Kind, argv: &[OsString]) -> clap::ArgMatches {
        kind.clap()
            .try_get_matches_from(&argv[1..])
            .unwrap_or_else(|e| panic!("{argv:?} does not parse: {e}"))
    }

    #[test]
    fn every_switch_has_a_negation_that_overrides_it_both_ways() {
        for kind in [Kind::Mount, Kind::Serve] {
            let cmd = kind.clap().mut_args(|a| {
                a.required(false)
                    .required_unless_present(clap::builder::Resettable::<clap::Id>::Reset)
            });
            let switches: Vec<&Arg> = settable(&cmd)
                .into_iter()
                .filter(|a| matches!(a.get_action(), ArgAction::SetTrue))
                .collect();
            assert!(!switches.is_empty(), "{kind:?} has no switch");
            for a in switches {
                let id = a.get_id().as_str();
                let on = format!("--{}", a.get_long().expect("a long flag"));
                let n = negation(&cmd, a).unwrap_or_else(|| panic!("{on} has no negation"));
                let off = format!("--{}", n.get_long().expect("a long flag"));
                for (line, want) in [
                    (vec![on.as_str()], true),
                    (vec![off.as_str()], false),
                    (vec![on.as_str(), off.as_str()], false),
                    (vec![off.as_str(), on.as_str()], true),
                ] {
                    let m = cmd
                        .clone()
                        .try_get_matches_from(std::iter::once("x").chain(line.iter().copied()))
                        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
                    assert_eq!(m.get_flag(id), want, "{kind:?} {line:?}");
                }
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(
                    help.contains(&format!("`{off}`")),
                    "{on}'s help does not name {off}"
                );
            }
        }
    }

    #[test]
    fn the_command_line_turns_a_files_switches_off_and_on() {
        let d = tempfile::tempdir().expect("tmp");
        write(
            d.path(),
            MAIN_FILE,
            "[volume.data]\nbacking = \"/srv/a\"\nmountpoint = \"/mnt/a\"\nmirror = \"/b\"\ncompress = true\nfsync_groups = true\nfsync_group_max_ms = 500\nforce_resync = false\n\n[serve.data]\ndir = \"/b\"\nlisten = \"0.0.0.0:7070\"\nno_udp = true\n",
        );
        let cfg = d.path().to_string_lossy().into_owned();
        let base = ["mirrorfs", "mount", "--volume", "data", "--config", &cfg];
        let m = parsed(Kind::Mount, &expand(os(&base)).expect("expands"));
        assert!(m.get_flag("compress") && m.get_flag("fsync_groups"));
        assert!(!m.get_flag("force_resync"));
        assert_eq!(m.get_one::<u64>("fsync_group_max_ms"), Some(&500));

        let line = [
            &base[..],
            &["--no-compress", "--no-fsync-groups", "--force-resync"],
        ]
        .concat();
        let m = parsed(Kind::Mount, &expand(os(&line)).expect("expands"));
        assert!(!m.get_flag("compress"), "--no-compress beats the file");
        assert!(
            !m.get_flag("fsync_groups"),
            "--no-fsync-groups beats the file"
        );
        assert!(
            m.get_flag("force_resync"),
            "--force-resync beats the file's false"
        );

        let serve = ["mirrorfs", "serve", "--volume", "data", "--config", &cfg];
        let m = parsed(Kind::Serve, &expand(os(&serve)).expect("expands"));
        assert!(m.get_flag("no_udp"));
        let m = parsed(
            Kind::Serve,
            &expand(os(&[&serve[..], &["--udp"]].concat())).expect("expands"),
        );
        assert!(
            !m.get_flag("no_udp"),
            "--udp beats the file's no_udp = true"
        );
    }

    #[test]
    fn errors_name_the_line_and_the_fix() {
        let d = tempfile::tempdir().expect("tmp");
        write(
            d.path(),
            MAIN_FILE,
            "# comment\n[volume.data]\nbacking = \"/srv/a\"\nmountpoint = \"/mnt/a\"\nmirror = \"/b\"\nack_mode = \"sync\"\nquorum = \"two\"\ncompress = 1\n\n[volumes.x]\n",
        );
        write(
            d.path(),
            "volumes.d/other.toml",
            "backing = \"/x\"\nack = \"fast\"\n",
        );
        let (entries, problems) = load(d.path());
        assert_eq!(entries.len(), 2);
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let has = |line: usize, needle: &str| {
            problems
                .iter()
                .any(|p| p.line == line && p.message.contains(needle))
        };
        assert!(has(6, "did you mean `ack`"), "{text:#?}");
        assert!(has(7, "quorum"), "{text:#?}");
        assert!(has(8, "true or false"), "{text:#?}");
        assert!(has(10, "did you mean `[volume.NAME]`"), "{text:#?}");
        assert!(has(2, "\"async\""), "{text:#?}");
        assert!(has(1, "has no `mountpoint`"), "{text:#?}");
    }

    /// The README's key tables are the commands' own flags: a flag added without its row fails
    /// here (the message holds the table to paste).
    #[test]
    fn the_readme_lists_every_key() {
        let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
            .expect("README.md");
        let mut wrong = String::new();
        for kind in [Kind::Mount, Kind::Serve] {
            let table = keys_markdown(kind);
            if !readme.contains(&table) {
                wrong.push_str(&format!("<<{}>>\n{table}<<end>>\n", kind.command()));
            }
        }
        assert!(
            wrong.is_empty(),
            "the README's key tables differ; they should read:\n{wrong}"
        );
    }

    #[test]
    fn every_mount_and_serve_flag_is_a_key() {
        let m = keys_markdown(Kind::Mount);
        for k in [
            "backing",
            "mountpoint",
            "mirror",
            "ack",
            "journal_max_mib",
            "options",
            "witness",
        ] {
            assert!(m.contains(&format!("| `{k}` |")), "{k} missing:\n{m}");
        }
        let s = keys_markdown(Kind::Serve);
        for k in ["dir", "listen", "on_diverged", "no_udp", "metrics"] {
            assert!(s.contains(&format!("| `{k}` |")), "{k} missing:\n{s}");
        }
        assert!(!m.contains("`volume`"));
    }
}
