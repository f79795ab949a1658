//! The packaging hook `BIN --generate KIND [--generate-dir DIR]`, as ripgrep's `--generate`:
//! man pages (clap_mangen) and shell completions (clap_complete) made from the binary's own
//! clap definition, so that what is installed always matches what the binary accepts.
//!
//! It is recognised before the ordinary command line is parsed (it needs no subcommand, and
//! `--help` does not list it). `man` writes `BIN.SECTION` and one page per subcommand
//! (`BIN-SUB.SECTION`, `BIN-SUB-SUBSUB.SECTION`) into DIR and prints each path written;
//! `complete-bash`, `complete-zsh` and `complete-fish` print the script to stdout.
//! The three binaries share it through `kmsfs-common`'s `generate` feature, which only they
//! turn on: the library itself has no business with command lines.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Arg, Command};

/// What `--generate` may make.
const KINDS: [&str; 4] = ["man", "complete-bash", "complete-zsh", "complete-fish"];

/// Runs the hook if the command line asks for it (its first argument is `--generate` or
/// `--generate=KIND`), returning the exit code; `None` for an ordinary command line.
/// `name` is the binary's name (clap's default would be the package's), `command` its full
/// clap definition, `section` its man pages' section.
pub fn run_if_asked(name: &'static str, command: impl FnOnce() -> Command, section: &str) -> Option<ExitCode> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let first = argv.get(1)?.to_str()?;
    if first != "--generate" && !first.starts_with("--generate=") {
        return None;
    }
    let command = command().name(name).bin_name(name);
    let hook = Command::new(name)
        .about("Generate man pages or shell completions (for packaging)")
        .no_binary_name(true)
        .arg(Arg::new("generate").long("generate").value_name("KIND").required(true).value_parser(KINDS))
        .arg(
            Arg::new("generate-dir")
                .long("generate-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Where `--generate man` writes its pages (created if missing)"),
        );
    let matches = match hook.try_get_matches_from(&argv[1..]) {
        Ok(matches) => matches,
        Err(e) => {
            let _ = e.print();
            return Some(ExitCode::from(2));
        }
    };
    let kind = matches.get_one::<String>("generate").map(String::as_str).unwrap_or_default();
    let dir = matches.get_one::<PathBuf>("generate-dir");
    let done = match (kind, dir) {
        ("man", Some(dir)) => write_man_pages(command, section, dir),
        ("man", None) => Err("--generate man needs --generate-dir DIR, where it writes one page per command".into()),
        (_, Some(_)) => Err(format!("--generate-dir is for --generate man only; {kind} prints to stdout")),
        (shell, None) => print_completions(command, shell, name),
    };
    Some(match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} --generate: {e}");
            ExitCode::FAILURE
        }
    })
}

/// Writes the page of `command` and of each of its visible subcommands, at any depth.
fn write_man_pages(command: Command, section: &str, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut command = command.disable_help_subcommand(true);
    // Building names each subcommand `BIN-SUB` (its display name), which titles its page.
    command.build();
    // Every page's footer names the package's binary and version, subcommands' too.
    let source = format!("{} {}", command.get_name(), command.get_version().unwrap_or_default());
    let mut written = Vec::new();
    write_pages(&command, section, &source, dir, &mut written)?;
    let mut stdout = std::io::stdout().lock();
    for path in written {
        let _ = writeln!(stdout, "{}", path.display());
    }
    Ok(())
}

fn write_pages(
    command: &Command,
    section: &str,
    source: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let page = clap_mangen::Man::new(command.clone()).section(section).source(source).manual("kmsfs");
    let path = page.generate_to(dir).map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
    written.push(path);
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_pages(sub, section, source, dir, written)?;
    }
    Ok(())
}

fn print_completions(mut command: Command, kind: &str, name: &str) -> Result<(), String> {
    let shell = match kind {
        "complete-bash" => clap_complete::Shell::Bash,
        "complete-zsh" => clap_complete::Shell::Zsh,
        "complete-fish" => clap_complete::Shell::Fish,
        other => return Err(format!("unknown kind {other}")),
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&script).and_then(|()| stdout.flush()).map_err(|e| format!("cannot write to stdout: {e}"))
}
