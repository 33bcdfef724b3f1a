//! `mirrorfs completion SHELL` and `mirrorfs man DIR`: shell completions and man pages made from
//! the command-line definitions themselves (clap_complete, clap_mangen), so they cannot drift
//! from `--help`.

use std::path::Path;

use anyhow::{Context, Result};

/// Prints the completion script for `shell` on standard output.
pub fn completion(mut cmd: clap::Command, shell: clap_complete::Shell) -> Result<()> {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}

/// Writes `mirrorfs.1` and one page per subcommand (`mirrorfs-mount.1`, ...) into `dir`,
/// creating it if needed, and prints each file's path.
pub fn man(cmd: clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    write_pages(&cmd, dir, None)
}

fn write_pages(cmd: &clap::Command, dir: &Path, parent: Option<&str>) -> Result<()> {
    let name = match parent {
        Some(p) => format!("{p}-{}", cmd.get_name()),
        None => cmd.get_name().to_string(),
    };
    // clap names are &'static str without its `string` feature: a page name lives as long as
    // this short-lived command anyway.
    let static_name: &'static str = name.clone().leak();
    let page = cmd.clone().name(static_name);
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut buf)
        .with_context(|| format!("cannot render the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{}", path.display());
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, dir, Some(&name))?;
    }
    Ok(())
}
