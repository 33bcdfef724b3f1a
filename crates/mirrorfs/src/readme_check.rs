//! The README cannot drift from the command line: every `mirrorfs ...` line in its shell code
//! blocks, and every `mount -t fuse.mirrorfs` / fstab line, is parsed here by the real clap
//! definition (`Cli`) and, for the mount helper's lines, by the helper's own option parser.
//! A README command that no longer parses fails with its README line number.
//! (`tests/readme.rs` runs the walkthroughs that can run on one machine.)

use std::ffi::OsString;

use clap::{CommandFactory, Parser};

use crate::Cli;

const README: &str = include_str!("../../../README.md");

/// A command found in a code block: its README line (1-based) and its words.
#[derive(Debug)]
struct Found {
    line: usize,
    words: Vec<String>,
}

/// The lines of the README's shell code blocks: indented (4 spaces after a blank line) and
/// fenced blocks without a language or marked sh/bash/console; a line ending in `\` is joined
/// with the next. Returns (line number of the first line, joined text).
fn shell_lines(readme: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    let mut fence: Option<bool> = None; // Some(is_shell) inside a fenced block
    let mut in_indented = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        if let Some(rest) = t.strip_prefix("```") {
            fence = match fence {
                Some(_) => None,
                None => Some(matches!(
                    rest.trim(),
                    "" | "sh" | "bash" | "console" | "shell"
                )),
            };
            continue;
        }
        let code = match fence {
            Some(shell) => shell.then_some(*l),
            None => {
                if l.trim().is_empty() {
                    // A blank line may sit inside an indented block; it never ends a command.
                    None
                } else if l.starts_with("    ")
                    && (in_indented || i == 0 || lines[i - 1].trim().is_empty())
                {
                    in_indented = true;
                    Some(&l[4..])
                } else {
                    in_indented = false;
                    None
                }
            }
        };
        let Some(code) = code else { continue };
        let (start, mut text) = pending.take().unwrap_or((i + 1, String::new()));
        let c = code.trim_end();
        if let Some(head) = c.strip_suffix('\\') {
            text.push_str(head);
            text.push(' ');
            pending = Some((start, text));
        } else {
            text.push_str(c);
            out.push((start, text));
        }
    }
    out
}

/// Splits a shell line into words: quotes kept together, a `#` that starts a word begins a
/// comment, and the command ends at `|`, `>`, `;`, `&&`.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut has = false;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    has = true;
                }
                '#' if !has => break,
                '|' | '>' | ';' | '&' => break,
                c if c.is_whitespace() => {
                    if has {
                        out.push(std::mem::take(&mut cur));
                        has = false;
                    }
                }
                c => {
                    cur.push(c);
                    has = true;
                }
            },
        }
    }
    if has {
        out.push(cur);
    }
    out
}

/// Placeholders the README uses, made concrete: `<...>` becomes a value, `$VAR` a path,
/// `[...]` (an optional part) is taken as given.
fn concrete(line: &str) -> String {
    let mut s = String::new();
    let mut in_angle = false;
    for c in line.chars() {
        match c {
            '<' if !in_angle => {
                in_angle = true;
                s.push_str("PLACEHOLDER");
            }
            '>' if in_angle => in_angle = false,
            _ if in_angle => {}
            '[' | ']' => {}
            c => s.push(c),
        }
    }
    s.split_whitespace()
        .map(|w| {
            if w.starts_with('$') {
                "/tmp/var".to_string()
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The commands in the README's shell blocks: `mirrorfs ...` (after a `host$` prompt or `sudo`),
/// `mount -t fuse.mirrorfs ...` and fstab lines of type `fuse.mirrorfs`, the latter two turned
/// into the helper's argument list (`mount.fuse.mirrorfs SOURCE MOUNTPOINT -o OPTS`).
fn commands(readme: &str) -> (Vec<Found>, Vec<Found>) {
    let mut cli = Vec::new();
    let mut helper = Vec::new();
    for (line, text) in shell_lines(readme) {
        let mut w = words(&concrete(&text));
        while let Some(first) = w.first() {
            if first.ends_with('$') || first == "sudo" {
                w.remove(0);
            } else {
                break;
            }
        }
        match w.first().map(String::as_str) {
            Some("mirrorfs") => cli.push(Found { line, words: w }),
            Some("mount") if w.iter().any(|a| a == "fuse.mirrorfs") => {
                let mut args = vec!["mount.fuse.mirrorfs".to_string()];
                let mut it = w.into_iter().skip(1);
                while let Some(a) = it.next() {
                    if a == "-t" {
                        it.next();
                    } else {
                        args.push(a);
                    }
                }
                helper.push(Found { line, words: args });
            }
            _ if w.len() == 6 && w[2] == "fuse.mirrorfs" => {
                let args = ["mount.fuse.mirrorfs", &w[0], &w[1], "-o", &w[3]];
                helper.push(Found {
                    line,
                    words: args.iter().map(|s| s.to_string()).collect(),
                });
            }
            _ => {}
        }
    }
    (cli, helper)
}

/// The README's config file example (its ```toml block), written into a fresh config directory.
fn readme_config_dir(readme: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let toml: Vec<&str> = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a ```toml block")
        .lines()
        .collect();
    std::fs::write(
        dir.path().join(crate::cli::config::MAIN_FILE),
        toml.join("\n"),
    )
    .expect("write the config file");
    dir
}

/// A `--volume NAME` line is expanded as `main` does, against the README's own config file.
fn parse_readme_cli(words: &[String], config: &std::path::Path) -> Result<(), String> {
    if !words.iter().any(|w| w == "--volume") {
        return parse_cli(words);
    }
    let mut argv: Vec<OsString> = words.iter().map(OsString::from).collect();
    argv.push("--config".into());
    argv.push(config.into());
    let argv = crate::cli::config::expand(argv).map_err(|e| format!("{e:#}"))?;
    let argv: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    parse_cli(&argv)
}

fn parse_cli(words: &[String]) -> Result<(), String> {
    Cli::try_parse_from(words)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn every_readme_command_parses() {
    let (cli, helper) = commands(README);
    // The README shows these; finding fewer means the extraction broke, not the README.
    assert!(
        cli.len() >= 25,
        "only {} mirrorfs commands found in README.md",
        cli.len()
    );
    assert!(
        helper.len() >= 2,
        "only {} mount(8)/fstab lines found",
        helper.len()
    );
    let config = readme_config_dir(README);
    let mut bad = Vec::new();
    for f in &cli {
        if let Err(e) = parse_readme_cli(&f.words, config.path()) {
            bad.push(format!(
                "README.md:{}: `{}`: {e}",
                f.line,
                f.words.join(" ")
            ));
        }
    }
    for f in &helper {
        let args: Vec<OsString> = f.words.iter().map(OsString::from).collect();
        let r = crate::cli::helper::parse(&args, &Cli::command()).and_then(|c| {
            let mut argv = vec!["mirrorfs".to_string()];
            argv.extend(
                c.mount_args
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned()),
            );
            parse_cli(&argv)
        });
        if let Err(e) = r {
            bad.push(format!(
                "README.md:{}: `{}`: {e}",
                f.line,
                f.words.join(" ")
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "README commands that do not parse:\n{}",
        bad.join("\n")
    );
}

#[test]
fn extraction_handles_the_readme_forms() {
    let md = "text\n\n    mirror$  mirrorfs mount /a /b --state /a/.m \\\n                 --mirror /c   # comment\n    sudo mirrorfs status $MNT --json | head\n\n```toml\n# mirrorfs mount --volume data\n```\n\n```\nmirrorfs conflicts [MOUNT] [--json]\n```\n";
    let (cli, _) = commands(md);
    let got: Vec<(usize, String)> = cli.iter().map(|f| (f.line, f.words.join(" "))).collect();
    assert_eq!(
        got,
        vec![
            (
                3,
                "mirrorfs mount /a /b --state /a/.m --mirror /c".to_string()
            ),
            (5, "mirrorfs status /tmp/var --json".to_string()),
            (12, "mirrorfs conflicts MOUNT --json".to_string()),
        ]
    );
    // A command that does not parse is found as such.
    assert!(parse_cli(&words("mirrorfs mount /a /b --no-such-flag")).is_err());
    assert!(parse_cli(&words("mirrorfs mount /a /b --mirror /c --ack sometimes")).is_err());
}
