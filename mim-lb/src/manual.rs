//! The manual pages and shell completions, generated from the CLI's own definitions (clap), so
//! they can never disagree with `--help`. `cargo xtask deb` puts them in the package.

use std::path::Path;

use clap::CommandFactory as _;

use crate::cli::Cli;

/// Writes `mim-lb.8` and one `mim-lb-COMMAND.8` per command into `dir` (section 8: a system
/// administration command).
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let cli = Cli::command().name("mim-lb");
    written.push(write_page(dir, "mim-lb", cli.clone())?);
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        // Named like git's pages (git-commit(1)), with the synopsis as it is typed.
        let name = format!("mim-lb-{}", sub.get_name());
        let typed = format!("mim-lb {}", sub.get_name());
        written.push(write_page(dir, &name, sub.clone().name(name.clone()).bin_name(typed))?);
    }
    Ok(written)
}

fn write_page(dir: &Path, name: &str, command: clap::Command) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.8"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command).section("8").source(format!("mim-lb {}", env!("CARGO_PKG_VERSION"))).render(&mut page)?;
    std::fs::write(&path, page)?;
    Ok(path)
}

/// The completion script for `shell`, as `mim-lb completions SHELL` prints it.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "mim-lb", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_command_gets_a_page_that_names_its_flags() {
        let dir = std::env::temp_dir().join(format!("mim-lb-man-{}", std::process::id()));
        let pages = write_man_pages(&dir);
        let run = std::fs::read_to_string(dir.join("mim-lb-run.8"));
        let _ = std::fs::remove_dir_all(&dir);
        let (pages, run) = (pages.unwrap(), run.unwrap());
        let names: Vec<String> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for expected in ["mim-lb.8", "mim-lb-run.8", "mim-lb-status.8", "mim-lb-drain.8", "mim-lb-ready.8"] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("man-pages")), "the hidden generator got a page: {names:?}");
        assert!(run.contains("keep\\-pinned"), "mim-lb-run.8 does not name --keep-pinned:\n{run}");
        assert!(run.starts_with(".ie") || run.contains(".TH"), "not a roff page:\n{run}");
    }

    #[test]
    fn bash_completion_knows_the_commands() {
        let mut out = Vec::new();
        completions(clap_complete::Shell::Bash, &mut out);
        let script = String::from_utf8(out).unwrap();
        for word in ["drain", "simulate", "--keep-pinned"] {
            assert!(script.contains(word), "bash completion lacks {word}");
        }
    }
}
