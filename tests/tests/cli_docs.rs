//! The packaging hook `BIN --generate KIND`: every binary's man pages (one per subcommand)
//! are roff that man(1) renders without a warning and document the options the binary
//! takes, and its bash completion loads and completes; the hook is not in `--help`.

use std::path::Path;
use std::process::{Command, Output};

use kmsfs_tests::bin;

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name)).args(args).output().expect("run the binary")
}

fn stdout_of(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    assert!(out.status.success(), "{name} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn has(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

/// The subcommand names `BIN [SUB...] --help` lists under "Commands:", `help` aside.
fn listed_subcommands(name: &str, path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let help = stdout_of(name, &args);
    let Some((_, rest)) = help.split_once("Commands:\n") else { return Vec::new() };
    rest.lines()
        .take_while(|line| line.starts_with("  "))
        // A wrapped description continues further in.
        .filter(|line| !line[2..].starts_with(' '))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|sub| *sub != "help")
        .map(str::to_string)
        .collect()
}

/// Every page man(1) would find for `name`: its own and one per subcommand, at any depth.
fn expected_pages(name: &str, section: &str) -> Vec<String> {
    fn walk(name: &str, path: &mut Vec<String>, section: &str, pages: &mut Vec<String>) {
        let mut page = name.to_string();
        for part in path.iter() {
            page = format!("{page}-{part}");
        }
        pages.push(format!("{page}.{section}"));
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        for sub in listed_subcommands(name, &args) {
            path.push(sub);
            walk(name, path, section, pages);
            path.pop();
        }
    }
    let mut pages = Vec::new();
    walk(name, &mut Vec::new(), section, &mut pages);
    pages.sort();
    pages
}

/// Warnings man(1) (or groff) prints while formatting `page`, as lintian checks pages.
fn roff_warnings(page: &Path) -> Option<String> {
    let out = if has("man") {
        Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(page)
            .env("LC_ALL", "C.UTF-8")
            .env("MANROFFSEQ", "")
            .env("MANWIDTH", "80")
            .output()
    } else if has("groff") {
        Command::new("groff").args(["-k", "-man", "-Tutf8", "-ww", "-z"]).arg(page).output()
    } else {
        return None;
    };
    let out = out.expect("run man");
    assert!(out.status.success(), "{}: {}", page.display(), String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn check_man_pages(name: &str, section: &str, documented: &[(&str, &str)]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pages_dir = dir.path().join("man");
    let printed = stdout_of(name, &["--generate", "man", "--generate-dir", pages_dir.to_str().expect("utf-8")]);
    let mut written: Vec<String> = std::fs::read_dir(&pages_dir)
        .expect("the pages' directory")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written, expected_pages(name, section), "{name}: one page per command");
    assert_eq!(printed.lines().count(), written.len(), "{name} prints each page it writes:\n{printed}");
    let mut checked_by_man = false;
    for file in &written {
        let path = pages_dir.join(file);
        let text = std::fs::read_to_string(&path).expect("read page");
        let title = file.rsplit_once('.').expect("section").0;
        assert!(
            text.lines().any(|line| line.starts_with(&format!(".TH {title} {section} "))),
            "{file} has no .TH {title} {section}:\n{text}"
        );
        for heading in [".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION"] {
            assert!(text.contains(heading), "{file} lacks {heading}");
        }
        assert!(!text.contains("generate\\-dir"), "{file} documents the hidden hook");
        if let Some(warnings) = roff_warnings(&path) {
            assert_eq!(warnings, "", "{file} is not clean roff");
            checked_by_man = true;
        }
    }
    if !checked_by_man {
        eprintln!("NOTE: neither man nor groff is installed: the pages were checked structurally only");
    }
    for (file, option) in documented {
        let text = std::fs::read_to_string(pages_dir.join(file)).expect("a documented page");
        assert!(text.contains(option), "{file} does not document {option}");
    }
}

#[test]
fn man_pages_are_clean_roff_one_per_command() {
    check_man_pages("kmsd", "8", &[("kmsd.8", "\\-\\-state\\-dir"), ("kmsd-init.8", "\\-\\-root\\-of\\-trust")]);
    check_man_pages(
        "kmsctl",
        "1",
        &[
            ("kmsctl.1", "Exit codes"),
            ("kmsctl-encrypt.1", "\\-\\-key\\-id"),
            ("kmsctl-audit-verify.1", "\\-\\-public\\-key"),
        ],
    );
    check_man_pages(
        "kmsfs",
        "1",
        &[("kmsfs-mount.1", "\\-\\-foreground"), ("kmsfs-snapshot-export.1", "\\-\\-to\\-key")],
    );
}

/// What bash's completion of `words` (the last one being completed) offers.
fn bash_completes(script: &Path, name: &str, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let line = words.join(" ");
    let program = format!(
        "source '{}' || exit 3\ncomplete -p {name} || exit 4\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{line}'\n\
         COMP_POINT={}\n_{name} {name} '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let out = Command::new("bash").arg("--norc").arg("-c").arg(&program).output().expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{name}'s completion did not load: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = stdout.lines();
    let registered = lines.next().unwrap_or_default();
    assert!(registered.contains(&format!("-F _{name} {name}")), "complete -p {name}: {registered}");
    lines.map(str::to_string).collect()
}

#[test]
fn completions_load_and_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[&str], &str); 4] = [
        ("kmsctl", &["kmsctl", "enc"], "encrypt"),
        ("kmsctl", &["kmsctl", "audit", "ver"], "verify"),
        ("kmsfs", &["kmsfs", "snapshot", "ex"], "export"),
        ("kmsd", &["kmsd", "--state-d"], "--state-dir"),
    ];
    for (name, words, expected) in cases {
        let script = dir.path().join(format!("{name}.bash"));
        std::fs::write(&script, stdout_of(name, &["--generate", "complete-bash"])).expect("write script");
        let syntax = Command::new("bash").arg("-n").arg(&script).output().expect("bash -n");
        assert!(syntax.status.success(), "{name}.bash: {}", String::from_utf8_lossy(&syntax.stderr));
        let offered = bash_completes(&script, name, words);
        assert_eq!(offered, [expected], "{words:?} completes to {offered:?}");
    }
    for name in ["kmsd", "kmsctl", "kmsfs"] {
        let zsh = stdout_of(name, &["--generate", "complete-zsh"]);
        assert!(zsh.starts_with(&format!("#compdef {name}\n")), "{name}'s zsh completion:\n{zsh}");
        let fish = stdout_of(name, &["--generate", "complete-fish"]);
        assert!(fish.contains(&format!("complete -c {name} ")), "{name}'s fish completion:\n{fish}");
        for (shell, script) in [("zsh", zsh), ("fish", fish)] {
            if !has(shell) {
                continue;
            }
            let path = dir.path().join(format!("{name}.{shell}"));
            std::fs::write(&path, script).expect("write script");
            let out = Command::new(shell).arg("-n").arg(&path).output().expect("shell -n");
            assert!(out.status.success(), "{name}.{shell}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn the_hook_is_hidden_and_refuses_bad_use() {
    for name in ["kmsd", "kmsctl", "kmsfs"] {
        let help = stdout_of(name, &["--help"]);
        assert!(!help.contains("--generate"), "{name} --help shows the hook:\n{help}");
        let out = run(name, &["--generate", "man"]);
        assert!(!out.status.success(), "{name} --generate man without a directory succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--generate-dir DIR"), "{name}: {stderr}");
        let out = run(name, &["--generate", "roff"]);
        assert_eq!(out.status.code(), Some(2), "{name} --generate roff");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("man, complete-bash, complete-zsh, complete-fish"), "{name}: {stderr}");
        let out = run(name, &["--generate", "complete-bash", "--generate-dir", "/nonexistent"]);
        assert!(!out.status.success() && out.stdout.is_empty(), "{name}: --generate-dir with a completion");
    }
}
