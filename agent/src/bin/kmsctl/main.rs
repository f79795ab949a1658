//! `kmsctl`, the command-line client of `kmsd`, shaped like `aws kms` (AWS CLI v2): the same
//! subcommands, flags, output formats, error messages and exit codes, plus a pipe mode for
//! encrypting, decrypting, signing and MACing raw bytes between stdin and stdout, and a PEM
//! output for public keys.
//!
//! `cli` declares the command line, `args` parses structured arguments, `commands` turns a
//! subcommand into an API call, `password` reads the secrets no argument may carry, `output`
//! renders responses; this module runs the call and maps failures to the aws CLI's exit codes.

mod args;
mod audit;
mod cli;
mod commands;
mod model;
mod output;
mod password;
mod table;

use std::io::{self, IsTerminal, Read, Write};
use std::process::ExitCode;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use clap::error::ErrorKind as ClapErrorKind;
use clap::{CommandFactory, Parser};
use kmsfs_common::client::{AgentClient, ClientError};
use kmsfs_common::KmsError;
use serde_json::Value;

use cli::{Cli, OutputFormat, TopCommand};
use commands::Mode;

/// Exit code of a command-line usage error (the aws CLI's).
const EXIT_USAGE: u8 = 252;
/// Exit code of an error answered by the service (the aws CLI's).
const EXIT_SERVICE: u8 = 254;
/// Exit code of any other failure: connection, I/O, malformed response (the aws CLI's).
const EXIT_OTHER: u8 = 255;
/// Exit code of `audit verify` on a log that was tampered with.
const EXIT_TAMPERED: u8 = 1;

/// Stdin larger than this is refused in pipe mode; KMS's own limits are a few KiB.
const MAX_STDIN: u64 = 1 << 20;

/// Why kmsctl failed, which decides the message and the exit code.
#[derive(Debug)]
pub enum Failure {
    /// The command line, or how kmsctl was invoked, is wrong.
    Usage(String),
    /// The agent answered `operation` with an error.
    Service { operation: &'static str, error: KmsError },
    /// Anything else: the agent cannot be reached, I/O failed, the response is malformed.
    Other(String),
    /// `audit verify` found the log tampered with.
    Tampered(String),
}

impl Failure {
    fn from_client(operation: &'static str, error: ClientError) -> Failure {
        match error {
            ClientError::Service(error) => Failure::Service { operation, error },
            other => Failure::Other(other.to_string()),
        }
    }

    /// Prints the failure to stderr as the aws CLI would and returns its exit code. A
    /// closed stderr is no reason to panic, so write errors are ignored.
    fn report(&self) -> ExitCode {
        let mut stderr = io::stderr().lock();
        let (message, code) = match self {
            Failure::Usage(message) => (format!("kmsctl: {message}"), EXIT_USAGE),
            Failure::Service { operation, error } => (
                format!(
                    "\nAn error occurred ({}) when calling the {operation} operation: {}",
                    error.kind, error.message
                ),
                EXIT_SERVICE,
            ),
            Failure::Other(message) => (format!("kmsctl: {message}"), EXIT_OTHER),
            Failure::Tampered(message) => (format!("kmsctl: audit log verification FAILED: {message}"), EXIT_TAMPERED),
        };
        let _ = writeln!(stderr, "{message}");
        ExitCode::from(code)
    }
}

fn main() -> ExitCode {
    if let Some(code) = kmsfs_common::generate::run_if_asked("kmsctl", Cli::command, "1") {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout and succeed; every other clap error is a usage
            // error, which the aws CLI exits with 252 rather than clap's 2.
            let _ = e.print();
            return match e.kind() {
                ClapErrorKind::DisplayHelp | ClapErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let socket = cli.socket.filter(|path| !path.as_os_str().is_empty());
    let command = match cli.command {
        TopCommand::Kms(command) => command,
        TopCommand::Audit(command) => return audit::run(&command, socket.as_deref()),
    };
    let commands::Call { action, mut request, mode, secret } = commands::plan(&command);
    if cli.output == OutputFormat::Pem && action != "GetPublicKey" {
        return Err(Failure::Usage("--output pem is only for get-public-key; use --output json or text".into()));
    }
    if let Some(secret) = &secret {
        // Read before the agent is reached, so that a bad source changes nothing. The
        // request body holds a plain copy for the call's short duration.
        let value = password::read(secret)?;
        if let Value::Object(members) = &mut request {
            members.insert(secret.member.to_string(), Value::String(value.to_string()));
        }
    }
    let stdout = io::stdout();
    if let Mode::Pipe { input, .. } = mode {
        if stdout.is_terminal() {
            return Err(Failure::Usage(format!(
                "refusing to write raw binary output to a terminal; redirect stdout to a file or \
                 pipe, or give --{} to get base64 in JSON",
                flag_name(input)
            )));
        }
        let blob = Value::String(STANDARD.encode(read_stdin()?));
        if let Value::Object(members) = &mut request {
            members.insert(input.to_string(), blob);
        }
    }
    let mut client = AgentClient::connect_or_start(socket.as_deref()).map_err(|e| Failure::Other(e.to_string()))?;
    let mut call = |request: &Value| client.call(action, request).map_err(|e| Failure::from_client(action, e));
    let response = match mode {
        Mode::Paginate { list } => commands::paginate(&mut call, request.clone(), list)?,
        Mode::Single | Mode::Pipe { .. } => call(&request)?,
    };
    // The call has succeeded; a follow-up that fails only leaves its warning out.
    let checked = commands::follow_up(action, &request).and_then(|(check, body)| client.call(check, &body).ok());
    let bytes = match mode {
        Mode::Pipe { output, .. } => raw_blob(&response, output)?,
        Mode::Single | Mode::Paginate { .. } if cli.output == OutputFormat::Pem => {
            output::public_key_pem(&raw_blob(&response, "PublicKey")?).into_bytes()
        }
        Mode::Single | Mode::Paginate { .. } => output::render(action, &response, cli.output).into_bytes(),
    };
    let mut stdout = stdout.lock();
    stdout
        .write_all(&bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::Other(format!("cannot write to stdout: {e}")))?;
    if let Some(warning) = commands::warning(action, &request, &response, checked.as_ref()) {
        // Last, so that it is what a terminal shows at the bottom; a closed stderr is no
        // reason to fail a call that has succeeded.
        let _ = io::stderr().lock().write_all(warning.as_bytes());
    }
    Ok(())
}

/// The command-line flag that supplies a request's blob member.
fn flag_name(member: &str) -> &'static str {
    match member {
        "Plaintext" => "plaintext",
        "Message" => "message",
        _ => "ciphertext-blob",
    }
}

fn read_stdin() -> Result<Vec<u8>, Failure> {
    let mut bytes = Vec::new();
    io::stdin()
        .lock()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::Other(format!("cannot read stdin: {e}")))?;
    if bytes.len() as u64 > MAX_STDIN {
        return Err(Failure::Usage(format!(
            "stdin holds more than {MAX_STDIN} bytes; KMS encrypts, signs or MACs at most 4096 bytes \
             directly (encrypt larger data under a data key from generate-data-key; sign a larger \
             message's digest with --message-type DIGEST)"
        )));
    }
    Ok(bytes)
}

/// The raw bytes of the base64 blob member `member` of a response.
fn raw_blob(response: &Value, member: &str) -> Result<Vec<u8>, Failure> {
    let encoded = response
        .get(member)
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::Other(format!("the agent's response has no {member}")))?;
    STANDARD.decode(encoded).map_err(|e| Failure::Other(format!("the agent's {member} is not valid base64: {e}")))
}
