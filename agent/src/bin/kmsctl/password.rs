//! Reading a secret request member, the key store password, from where the command line
//! says: a file, or stdin, after a prompt that does not echo when stdin is a terminal. Never
//! from an argument's value, which every user of the machine can read in the process list.

use std::fs;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

use crate::commands::{Secret, SecretSource};
use crate::Failure;

/// Input longer than this is no password (the model allows 32 characters); it is refused
/// rather than read whole.
const MAX_SECRET: u64 = 4096;

/// The secret `secret` names, read from its source.
pub fn read(secret: &Secret) -> Result<Zeroizing<String>, Failure> {
    let value = match &secret.source {
        SecretSource::Argv { flag, instead } => {
            return Err(Failure::Usage(format!(
                "{flag} is refused: a command-line value can be read by every user of this machine in the process \
                 list (ps, /proc/PID/cmdline). Put the password in a file only you can read and give {instead} \
                 FILE, or give it on stdin ({instead} -), or type it at the prompt"
            )))
        }
        SecretSource::File(path) => from_file(path)?,
        SecretSource::Stdin if io::stdin().is_terminal() => prompt()?,
        SecretSource::Stdin => piped()?,
    };
    if value.is_empty() {
        let source = match &secret.source {
            SecretSource::File(path) => path.display().to_string(),
            _ => "stdin".to_string(),
        };
        return Err(Failure::Usage(format!(
            "no key store password: {source} is empty; it must hold the password (the token's user PIN)"
        )));
    }
    Ok(value)
}

fn from_file(path: &Path) -> Result<Zeroizing<String>, Failure> {
    let cannot =
        |e: io::Error| Failure::Usage(format!("cannot read the key store password from {}: {e}", path.display()));
    let file = fs::File::open(path).map_err(cannot)?;
    bounded(file, &path.display().to_string()).map_err(|e| match e {
        Bounded::Io(e) => cannot(e),
        Bounded::Invalid(why) => Failure::Usage(why),
    })
}

fn piped() -> Result<Zeroizing<String>, Failure> {
    bounded(io::stdin().lock(), "stdin").map_err(|e| match e {
        Bounded::Io(e) => Failure::Other(format!("cannot read the key store password from stdin: {e}")),
        Bounded::Invalid(why) => Failure::Usage(why),
    })
}

enum Bounded {
    Io(io::Error),
    Invalid(String),
}

/// Everything `input` holds, at most [`MAX_SECRET`] bytes of UTF-8, without one trailing
/// newline (a file written by `echo` or an editor ends with one).
fn bounded(input: impl Read, name: &str) -> Result<Zeroizing<String>, Bounded> {
    let mut bytes = Zeroizing::new(Vec::new());
    input.take(MAX_SECRET + 1).read_to_end(&mut bytes).map_err(Bounded::Io)?;
    if bytes.len() as u64 > MAX_SECRET {
        return Err(Bounded::Invalid(format!(
            "{name} holds more than {MAX_SECRET} bytes, which is no key store password"
        )));
    }
    text(&bytes, name)
}

/// `bytes` as UTF-8 without one trailing `\n` or `\r\n`.
fn text(bytes: &[u8], name: &str) -> Result<Zeroizing<String>, Bounded> {
    let bytes = bytes.strip_suffix(b"\n").map(|b| b.strip_suffix(b"\r").unwrap_or(b)).unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|_| Bounded::Invalid(format!("{name} does not hold UTF-8 text")))?;
    Ok(Zeroizing::new(text.to_string()))
}

/// Asks on the terminal (stderr for the prompt, stdin for the answer) with echo turned off,
/// as `read -s` does. Echo is switched with `stty`, which keeps kmsctl free of unsafe code;
/// if kmsctl is killed meanwhile, the shell restores the terminal it saved.
fn prompt() -> Result<Zeroizing<String>, Failure> {
    let echo_off = EchoOff::new()?;
    let mut stderr = io::stderr().lock();
    let _ = write!(stderr, "Key store password (the token's user PIN): ");
    let _ = stderr.flush();
    let mut line = Zeroizing::new(String::new());
    let read = io::stdin().lock().take(MAX_SECRET + 1).read_line(&mut line);
    drop(echo_off);
    // The newline typed was not echoed either.
    let _ = writeln!(stderr);
    read.map_err(|e| Failure::Other(format!("cannot read the key store password from the terminal: {e}")))?;
    if line.len() as u64 > MAX_SECRET {
        return Err(Failure::Usage(format!("more than {MAX_SECRET} bytes typed, which is no key store password")));
    }
    text(line.as_bytes(), "the terminal").map_err(|e| match e {
        Bounded::Io(e) => Failure::Other(e.to_string()),
        Bounded::Invalid(why) => Failure::Usage(why),
    })
}

/// The terminal on stdin with echo off, restored to its saved settings on drop.
struct EchoOff {
    saved: String,
}

impl EchoOff {
    fn new() -> Result<EchoOff, Failure> {
        let refuse = |why: String| {
            Failure::Other(format!(
                "cannot turn off echo to read the key store password from the terminal ({why}); give it in a file \
                 with --key-store-password-file FILE instead"
            ))
        };
        let saved = stty(&["-g"]).map_err(refuse)?;
        stty(&["-echo"]).map_err(refuse)?;
        Ok(EchoOff { saved: saved.trim().to_string() })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if stty(&[&self.saved]).is_err() {
            let _ = stty(&["echo"]);
        }
    }
}

/// Runs `stty` on the terminal that is kmsctl's stdin; its output.
fn stty(args: &[&str]) -> Result<String, String> {
    let out = Command::new("stty")
        .args(args)
        .stdin(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run stty: {e}"))?;
    if !out.status.success() {
        return Err(format!("stty {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn from(source: SecretSource) -> Result<Zeroizing<String>, Failure> {
        read(&Secret { member: "KeyStorePassword", source })
    }

    #[test]
    fn files_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        for (content, expected) in [
            (&b"s3cret-pin\n"[..], "s3cret-pin"),
            (b"s3cret-pin\r\n", "s3cret-pin"),
            (b"s3cret-pin", "s3cret-pin"),
            (b" spaced pin \n\n", " spaced pin \n"),
        ] {
            let path = dir.path().join("pw");
            fs::write(&path, content).unwrap();
            assert_eq!(&from(SecretSource::File(path)).unwrap()[..], expected, "{content:?}");
        }
    }

    #[test]
    fn bad_files_are_usage_errors_that_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = from(SecretSource::File(missing.clone())).unwrap_err();
        assert!(matches!(&err, Failure::Usage(m) if m.contains(&missing.display().to_string())), "{err:?}");
        for (content, needle) in
            [(&b"\n"[..], "is empty"), (&[0xff, 0xfe][..], "UTF-8"), (&[b'a'; 5000][..], "more than 4096 bytes")]
        {
            let path = dir.path().join("pw");
            fs::write(&path, content).unwrap();
            let err = from(SecretSource::File(path)).unwrap_err();
            assert!(matches!(&err, Failure::Usage(m) if m.contains(needle)), "{needle}: {err:?}");
        }
    }

    #[test]
    fn command_line_values_are_refused_with_the_alternatives() {
        let err = from(SecretSource::Argv { flag: "--key-store-password", instead: "--key-store-password-file" });
        let Err(Failure::Usage(message)) = err else { panic!("not a usage error") };
        assert!(message.contains("process list") && message.contains("--key-store-password-file FILE"), "{message}");
    }
}
