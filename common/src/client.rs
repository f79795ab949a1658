//! A small blocking client for the agent's socket: AWS JSON 1.1 over HTTP/1.1 on a Unix
//! stream, one keep-alive connection per client. `kmsctl`, `kmsfs` and the tests use it;
//! AWS SDKs speak the same protocol over their own transports.
//!
//! `connect_or_start` implements agent discovery: an explicit socket, then `KMSD_SOCKET`,
//! then the system agent, then a per-user agent it starts on demand (as gpg-agent does).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use zeroize::{Zeroize, Zeroizing};

use crate::error::KmsError;
use crate::paths;

/// Responses larger than this are refused rather than buffered.
const MAX_RESPONSE: usize = 16 << 20;

/// What can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {}: {}", path.display(), connect_advice(path, source))]
    Connect { path: PathBuf, source: io::Error },
    /// No agent answered, and the per-user agent kmsctl or kmsfs tried to start did not.
    #[error("no agent answered, and a per-user agent could not be started on {}: {message}", socket.display())]
    Start { socket: PathBuf, message: String },
    #[error("connection to the agent failed: {0}")]
    Io(#[from] io::Error),
    #[error("the agent sent a malformed response: {0}")]
    Protocol(String),
    #[error("{0}")]
    Service(KmsError),
}

impl ClientError {
    /// The service error, if the agent answered with one.
    pub fn service(&self) -> Option<&KmsError> {
        match self {
            ClientError::Service(e) => Some(e),
            _ => None,
        }
    }
}

/// Why an agent's socket could not be connected to, and what to run about it.
fn connect_advice(path: &Path, error: &io::Error) -> String {
    let system = path == paths::system_socket();
    let start = if system {
        "Start the system agent: `systemctl start kmsd.socket` (`systemctl enable --now kmsd.socket` to have \
         it at every boot)"
            .to_string()
    } else {
        format!(
            "Start an agent there (`kmsd --socket {}`), or leave out --socket and KMSD_SOCKET: kmsctl and kmsfs \
             then use the system agent ({}) or start a per-user agent of your own",
            path.display(),
            paths::system_socket().display()
        )
    };
    match error.kind() {
        io::ErrorKind::NotFound => format!("no agent is listening there (no such socket). {start}"),
        io::ErrorKind::ConnectionRefused => format!(
            "the socket is there but no agent listens on it: kmsd has stopped or crashed ({}). {start}",
            if system { "`journalctl -u kmsd` says why" } else { "its log says why" }
        ),
        io::ErrorKind::PermissionDenied if system => format!(
            "permission denied ({error}): the system agent's socket is open to every user (kmsd.socket's \
             SocketMode=0666), so check the permissions of {} and the directories above it",
            path.display()
        ),
        io::ErrorKind::PermissionDenied => format!(
            "permission denied: this socket, or a directory above it, is not open to you (another user's \
             agent?). Use the system agent ({}) or your own per-user agent: leave out --socket and KMSD_SOCKET",
            paths::system_socket().display()
        ),
        _ => format!("{error}. {start}"),
    }
}

/// A raw HTTP response from the agent.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A base64 secret in a response (a plaintext, a data key), decoded into memory that is
/// zeroized when dropped; the base64 text is zeroized as soon as it is decoded.
pub struct SecretBytes(pub Zeroizing<Vec<u8>>);

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SecretBytes, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(|bytes| SecretBytes(Zeroizing::new(bytes)))
            .map_err(|_| serde::de::Error::custom("a secret is not valid base64"))
    }
}

/// The error a non-200 answer with JSON body `body` carries.
fn refusal(status: u16, body: &serde_json::Value) -> ClientError {
    match KmsError::from_wire(body) {
        Some(e) => ClientError::Service(e),
        None => ClientError::Protocol(format!("HTTP {status} without an error body")),
    }
}

/// A connection to one agent socket.
pub struct AgentClient {
    path: PathBuf,
    stream: Option<BufReader<UnixStream>>,
}

impl AgentClient {
    /// Connects to the agent listening on `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<AgentClient, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream =
            UnixStream::connect(&path).map_err(|source| ClientError::Connect { path: path.clone(), source })?;
        Ok(AgentClient { path, stream: Some(BufReader::new(stream)) })
    }

    /// Finds the agent as `kmsctl` and `kmsfs` do, starting a per-user agent if none answers.
    pub fn connect_or_start(explicit: Option<&Path>) -> Result<AgentClient, ClientError> {
        if let Some(path) = explicit {
            return AgentClient::connect(path);
        }
        if let Some(path) = std::env::var_os("KMSD_SOCKET").filter(|v| !v.is_empty()) {
            return AgentClient::connect(PathBuf::from(path));
        }
        if let Ok(client) = AgentClient::connect(paths::system_socket()) {
            return Ok(client);
        }
        let socket = paths::default_socket();
        if let Ok(client) = AgentClient::connect(&socket) {
            return Ok(client);
        }
        start_agent(&socket, &paths::default_state_dir())?;
        AgentClient::connect(&socket)
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Calls `action` (an AWS KMS action such as `Encrypt`, or a kmsd extension such as
    /// `Kmsfs.GetAgentStats`) with a JSON request and returns the JSON response, or the service's
    /// error.
    pub fn call(&mut self, action: &str, request: &serde_json::Value) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let response = self.call_raw(action, &body)?;
        let value: serde_json::Value = if response.body.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(&response.body)
                .map_err(|e| ClientError::Protocol(format!("response is not JSON: {e}")))?
        };
        if response.status == 200 {
            return Ok(value);
        }
        Err(refusal(response.status, &value))
    }

    /// [`call`](Self::call) for answers that carry secrets: the response is read straight
    /// into `T`, whose secret members should be [`SecretBytes`], and its text is zeroized.
    pub fn call_secret<T: DeserializeOwned>(
        &mut self,
        action: &str,
        request: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut response = self.call_raw(action, &body)?;
        let answer = if response.status == 200 {
            // serde's message could quote the response: only say where it went wrong.
            serde_json::from_slice::<T>(&response.body).map_err(|e| {
                ClientError::Protocol(format!(
                    "unexpected answer to {action} (line {}, column {})",
                    e.line(),
                    e.column()
                ))
            })
        } else {
            Err(refusal(response.status, &serde_json::from_slice(&response.body).unwrap_or_default()))
        };
        response.body.zeroize();
        answer
    }

    /// Sends a request body as-is and returns the status and body. Retries once on a fresh
    /// connection when a kept-alive connection turns out to have been closed before the
    /// agent read anything.
    pub fn call_raw(&mut self, action: &str, body: &[u8]) -> Result<RawResponse, ClientError> {
        let reused = self.stream.is_some();
        match self.exchange(action, body) {
            Ok(r) => Ok(r),
            Err(ExchangeError::ClosedBeforeReply(_)) if reused => {
                self.stream = None;
                self.exchange(action, body).map_err(ExchangeError::into_client)
            }
            Err(e) => {
                self.stream = None;
                Err(e.into_client())
            }
        }
    }

    fn exchange(&mut self, action: &str, body: &[u8]) -> Result<RawResponse, ExchangeError> {
        if self.stream.is_none() {
            let s = UnixStream::connect(&self.path)
                .map_err(|source| ExchangeError::Fatal(ClientError::Connect { path: self.path.clone(), source }))?;
            self.stream = Some(BufReader::new(s));
        }
        let Some(reader) = self.stream.as_mut() else {
            return Err(ExchangeError::Fatal(ClientError::Protocol("no connection".into())));
        };
        // AWS actions are bare names; kmsd's extensions carry their own prefix (`Kmsfs.`).
        let target = if action.contains('.') { action.to_string() } else { format!("TrentService.{action}") };
        let head = format!(
            "POST / HTTP/1.1\r\nHost: kmsd\r\nContent-Type: application/x-amz-json-1.1\r\n\
             X-Amz-Target: {target}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = reader.get_mut();
        let mut message = Vec::with_capacity(head.len() + body.len());
        message.extend_from_slice(head.as_bytes());
        message.extend_from_slice(body);
        stream.write_all(&message).map_err(ExchangeError::ClosedBeforeReply)?;
        let response = read_response(reader)?;
        if response.close {
            self.stream = None;
        }
        Ok(RawResponse { status: response.status, body: response.body })
    }
}

enum ExchangeError {
    /// The connection died before any byte of a reply: safe to retry on a new one.
    ClosedBeforeReply(io::Error),
    Fatal(ClientError),
}

impl ExchangeError {
    fn into_client(self) -> ClientError {
        match self {
            ExchangeError::ClosedBeforeReply(e) => ClientError::Io(e),
            ExchangeError::Fatal(e) => e,
        }
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
    close: bool,
}

/// A response's status line and the headers that frame its body.
struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
}

fn read_head(reader: &mut BufReader<UnixStream>) -> Result<Head, ExchangeError> {
    let protocol = |m: &str| ExchangeError::Fatal(ClientError::Protocol(m.to_string()));
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => {
            return Err(ExchangeError::ClosedBeforeReply(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            )))
        }
        Ok(_) => {}
        Err(e) => return Err(ExchangeError::ClosedBeforeReply(e)),
    }
    let status: u16 =
        line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| protocol("bad status line"))?;
    let mut head = Head { status, content_length: None, chunked: false, close: false };
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| ExchangeError::Fatal(e.into()))?;
        if n == 0 {
            return Err(protocol("connection closed inside the response headers"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(protocol("bad header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.parse().map_err(|_| protocol("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            head.close = true;
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            head.chunked = true;
        }
    }
}

fn read_response(reader: &mut BufReader<UnixStream>) -> Result<Response, ExchangeError> {
    let protocol = |m: &str| ExchangeError::Fatal(ClientError::Protocol(m.to_string()));
    let Head { status, content_length, chunked, mut close } = read_head(reader)?;
    let body = if chunked {
        read_chunked(reader).map_err(ExchangeError::Fatal)?
    } else if let Some(len) = content_length {
        if len > MAX_RESPONSE {
            return Err(protocol("response too large"));
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).map_err(|e| ExchangeError::Fatal(e.into()))?;
        body
    } else {
        close = true;
        let mut body = Vec::new();
        reader.take(MAX_RESPONSE as u64).read_to_end(&mut body).map_err(|e| ExchangeError::Fatal(e.into()))?;
        body
    };
    Ok(Response { status, body, close })
}

/// Reads one chunk of a chunked body into `body`; returns false at the last chunk.
fn read_chunk(reader: &mut BufReader<UnixStream>, body: &mut Vec<u8>) -> Result<bool, ClientError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(ClientError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the agent closed the stream")));
    }
    let size_field = line.trim_end().split(';').next().unwrap_or("");
    let size = usize::from_str_radix(size_field, 16).map_err(|_| ClientError::Protocol("bad chunk size".into()))?;
    if body.len() + size > MAX_RESPONSE {
        return Err(ClientError::Protocol("response too large".into()));
    }
    if size == 0 {
        // Trailers, then the blank line.
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                return Ok(false);
            }
        }
    }
    let start = body.len();
    body.resize(start + size, 0);
    reader.read_exact(&mut body[start..])?;
    let mut crlf = [0u8; 2];
    reader.read_exact(&mut crlf)?;
    Ok(true)
}

/// A stream of key state changes (`Kmsfs.WatchKeyEvents`, a kmsd extension): one JSON
/// object per event — `Subscribed` first, then `KeyStateChanged` (`KeyId`, `KeyArn`,
/// `KeyState`), `Heartbeat` every 10 s, or `Lagged` if events were missed.
pub struct KeyEventStream {
    reader: BufReader<UnixStream>,
    pending: Vec<u8>,
    ended: bool,
}

impl KeyEventStream {
    /// Subscribes on the agent at `path`. With `timeout`, a silent agent (no heartbeat)
    /// makes `next_event` fail after that long.
    pub fn subscribe(path: &Path, timeout: Option<Duration>) -> Result<KeyEventStream, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
        stream.set_read_timeout(timeout)?;
        let mut reader = BufReader::new(stream);
        reader.get_mut().write_all(
            b"POST / HTTP/1.1\r\nHost: kmsd\r\nContent-Type: application/x-amz-json-1.1\r\n\
              X-Amz-Target: Kmsfs.WatchKeyEvents\r\nContent-Length: 2\r\n\r\n{}",
        )?;
        let head = read_head(&mut reader).map_err(ExchangeError::into_client)?;
        if head.status != 200 {
            let mut body = vec![0u8; head.content_length.unwrap_or(0).min(MAX_RESPONSE)];
            reader.read_exact(&mut body)?;
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            return Err(match KmsError::from_wire(&value) {
                Some(e) => ClientError::Service(e),
                None => ClientError::Protocol(format!("HTTP {} to WatchKeyEvents", head.status)),
            });
        }
        if !head.chunked {
            return Err(ClientError::Protocol("the event stream is not chunked".into()));
        }
        Ok(KeyEventStream { reader, pending: Vec::new(), ended: false })
    }

    /// The next event; `None` once the agent has ended the stream (it is stopping).
    pub fn next_event(&mut self) -> Result<Option<serde_json::Value>, ClientError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let event =
                    serde_json::from_slice(&line).map_err(|e| ClientError::Protocol(format!("bad event line: {e}")))?;
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            if !read_chunk(&mut self.reader, &mut self.pending)? {
                self.ended = true;
            }
        }
    }
}

fn read_chunked(reader: &mut BufReader<UnixStream>) -> Result<Vec<u8>, ClientError> {
    let mut body = Vec::new();
    while read_chunk(reader, &mut body)? {}
    Ok(body)
}

/// The `kmsd` binary to start: `KMSD_BIN`, else the one beside the running executable,
/// else `kmsd` on `PATH`.
pub fn kmsd_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("KMSD_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    if let Some(sibling) =
        std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join("kmsd"))).filter(|p| p.is_file())
    {
        return sibling;
    }
    PathBuf::from("kmsd")
}

/// Starts a detached per-user `kmsd` on `socket` and waits until it accepts connections.
/// Its output goes to `kmsd.log` in its state directory.
pub fn start_agent(socket: &Path, state_dir: &Path) -> Result<(), ClientError> {
    let fail = |message: String| ClientError::Start { socket: socket.to_path_buf(), message };
    let log_path = state_dir.join("kmsd.log");
    std::fs::create_dir_all(state_dir).map_err(|e| fail(format!("cannot create {}: {e}", state_dir.display())))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| fail(format!("cannot open {}: {e}", log_path.display())))?;
    let log_err = log.try_clone().map_err(|e| fail(e.to_string()))?;
    // Where this start's lines begin in the (appended) log.
    let logged_before = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let binary = kmsd_binary();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(&binary)
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => fail(format!(
                    "there is no kmsd to start ({} not found): install kmsd beside kmsctl or on PATH, or name it \
                     with KMSD_BIN; or start the system agent: `systemctl start kmsd.socket`",
                    binary.display()
                )),
                _ => fail(format!("cannot start {}: {e}", binary.display())),
            })?
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let said = std::fs::read(&log_path).unwrap_or_default();
            let said = String::from_utf8_lossy(said.get(logged_before..).unwrap_or_default());
            let last = said.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("");
            return Err(fail(format!("kmsd exited with {status}: {last} (from {})", log_path.display())));
        }
        if Instant::now() > deadline {
            return Err(fail(format!("kmsd did not start within 15 s; see {}", log_path.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
