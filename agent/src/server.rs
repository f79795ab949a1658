//! The transport: AWS JSON 1.1 over HTTP/1.1 on a Unix socket, and optionally on TCP.
//!
//! Each connection is served by hyper on the tokio runtime. How the caller is identified
//! depends on the listener ([`Peer`]): on the Unix socket by the kernel (SO_PEERCRED) when
//! the connection is accepted, never by the request; on TCP by each request's AWS Signature
//! Version 4 with one of the agent's access keys ([`crate::sigv4`], [`crate::access_keys`]).
//!
//! With TLS ([`crate::tls`]), every TCP connection is a TLS connection: its handshake runs on
//! a task of its own under [`HANDSHAKE_TIMEOUT`], so a slow or hostile client never holds up
//! the accept loop, and a failed handshake is logged with the peer's address and dropped.
//! A connection whose first byte is not a TLS handshake record is answered with one plain
//! HTTP 400 saying that the port speaks TLS, and closed. Under mutual TLS the verified
//! client certificate's identity is a principal (`role/tls/<identity>`) of every request
//! on the connection, beside the access key's; SigV4 is required all the same.
//! A request is `POST /` with `X-Amz-Target: TrentService.<Action>`; bodies larger than
//! [`MAX_BODY`] are refused from their Content-Length, or as soon as they grow past it.
//! Actions that write to the store, and batches, run on the blocking pool; the others run
//! inline.
//!
//! On TCP, a `POST /` without `X-Amz-Target` is an AWS query-protocol request for STS, of
//! which only `GetCallerIdentity` is answered (in STS's XML), so that SDK tooling that asks
//! who it is works.
//!
//! Beyond AWS's `TrentService`, kmsd's extensions share the socket under the `Kmsfs.`
//! target prefix: `Kmsfs.GenerateDataKeys` is GenerateDataKey for many encryption contexts
//! at once (kmsfs's key pool uses it), `Kmsfs.WatchKeyEvents` streams key state changes as
//! JSON lines (kmsfs drops cached data keys of a key the moment it is disabled),
//! `Kmsfs.GetAgentStats` reports request counts per action, and `Kmsfs.GetAuditInfo` names
//! the audit directory and public key (and with `"Seal": true` has the log sealed by a
//! digest).
//!
//! Every request is audited ([`crate::audit`]): [`respond`] answers it, then appends its
//! record and replies only once the record is durable — or, if it cannot be written, with
//! `KMSInternalException` instead of the result. While the log cannot be written, every
//! request is refused before it is read.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Channel, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kmsfs_common::{ErrorKind, KmsError};
use tokio::net::{TcpListener, UnixListener};
use zeroize::Zeroize;

use crate::access_keys::{AccessKey, AccessKeyStore};
use crate::agent::{Agent, KeyEvent};
use crate::audit::event::{self as audit_event, Inspected};
use crate::audit::AuditLog;
use crate::authz::Authz;
use crate::identity::identify;
use crate::policy::eval::Caller;
use crate::service;
use crate::tls::TlsSettings;

/// The largest request body accepted: room for a 128 KiB key policy with JSON escaping
/// (the model's largest member), far more than any cryptographic request needs.
pub const MAX_BODY: usize = 512 * 1024;

/// How long a TCP client has to complete its TLS handshake (or to send its plain HTTP
/// request to a TLS port) before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many TLS handshakes may be in progress at once; a connection beyond that is closed
/// at once (the accept loop never waits for a handshake).
const MAX_HANDSHAKES: usize = 1024;

/// The first byte of a TLS handshake record (ContentType `handshake`).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Where requests come from: the Unix socket, and the TCP listeners (none by default)
/// whose callers sign with the access keys of `access_keys`, over TLS if `tls` is set.
pub struct Listeners {
    pub unix: UnixListener,
    pub tcp: Vec<TcpListener>,
    pub access_keys: Arc<AccessKeyStore>,
    pub tls: Option<Arc<TlsSettings>>,
}

/// How a connection's caller is known.
#[derive(Clone)]
enum Peer {
    /// By the kernel, once for the connection: the caller, and its `userIdentity` record.
    Kernel(Arc<Caller>, Arc<serde_json::Value>),
    /// By each request's SigV4 signature, on a TCP connection.
    SigV4(Arc<Remote>),
}

/// A TCP connection's caller, as far as the connection tells.
struct Remote {
    access_keys: Arc<AccessKeyStore>,
    address: Option<std::net::SocketAddr>,
    /// The identity of the verified client certificate (mutual TLS).
    tls_client: Option<String>,
}

/// A TCP connection ready for HTTP: plain, or past its TLS handshake.
enum TcpConnection {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>, Option<String>),
}

/// Serves `listeners` until `shutdown` resolves, then lets requests in flight finish
/// (for up to 30 seconds) before returning. Requests are recorded in `audit` (`None`: the
/// audit trail is off).
pub async fn serve(
    agent: Arc<Agent>,
    audit: Option<Arc<AuditLog>>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared { agent, audit, stats: Stats::default(), stopping });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true).timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    // Each TCP listener accepts on its own task (handshakes on tasks of their own) and hands
    // connections to this loop.
    let (tcp_tx, mut tcp_rx) = tokio::sync::mpsc::channel::<(TcpConnection, Option<std::net::SocketAddr>)>(16);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let acceptors: Vec<_> = listeners
        .tcp
        .into_iter()
        .map(|l| tokio::spawn(accept_tcp(l, listeners.tls.clone(), handshakes.clone(), tcp_tx.clone())))
        .collect();
    drop(tcp_tx);
    let access_keys = listeners.access_keys;
    let listener = listeners.unix;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match identify(&stream) {
                    Ok(identity) => {
                        let caller = Arc::new(Authz::caller(&identity, &shared.agent.scope.account));
                        let recorded = Arc::new(audit_event::unix_identity(&identity, &caller));
                        serve_connection(&http, &graceful, &shared, Peer::Kernel(caller, recorded), stream);
                    }
                    Err(e) => tracing::warn!("cannot read peer credentials, dropping connection: {e}"),
                },
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some((connection, address)) = tcp_rx.recv() => {
                let remote = |tls_client| Peer::SigV4(Arc::new(Remote { access_keys: access_keys.clone(), address, tls_client }));
                match connection {
                    TcpConnection::Plain(stream) => serve_connection(&http, &graceful, &shared, remote(None), stream),
                    TcpConnection::Tls(stream, tls_client) => {
                        serve_connection(&http, &graceful, &shared, remote(tls_client), *stream)
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    for acceptor in acceptors {
        acceptor.abort();
    }
    tracing::info!("shutting down: finishing requests in flight");
    // Event streams never finish on their own: end them so their connections can close.
    let _ = stopping_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections did not finish within 30 s");
    }
}

async fn accept_tcp(
    listener: TcpListener,
    tls: Option<Arc<TlsSettings>>,
    handshakes: Arc<tokio::sync::Semaphore>,
    connections: tokio::sync::mpsc::Sender<(TcpConnection, Option<std::net::SocketAddr>)>,
) {
    loop {
        let (stream, address) = match listener.accept().await {
            Ok((stream, address)) => (stream, address),
            Err(e) => {
                tracing::warn!("TCP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(tls) = &tls else {
            if connections.send((TcpConnection::Plain(stream), Some(address))).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(peer = %address, "{MAX_HANDSHAKES} TLS handshakes in progress already; connection dropped");
            continue;
        };
        let (config, connections) = (tls.current(), connections.clone());
        tokio::spawn(async move {
            let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls_handshake(stream, address, config)).await;
            drop(permit);
            match accepted {
                Ok(Some(connection)) => {
                    let _ = connections.send((connection, Some(address))).await;
                }
                Ok(None) => {}
                Err(_) => tracing::info!(peer = %address, "TLS handshake timed out; connection dropped"),
            }
        });
    }
}

/// Takes a TCP connection through its TLS handshake; `None` if it did not complete (logged)
/// or was plain HTTP (answered).
async fn tls_handshake(
    stream: tokio::net::TcpStream,
    address: std::net::SocketAddr,
    config: Arc<rustls::ServerConfig>,
) -> Option<TcpConnection> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(0) => return None,
        Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => {
            refuse_plain_http(stream, address).await;
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(peer = %address, "TCP connection failed before its TLS handshake: {e}");
            return None;
        }
    }
    let tls = match tokio_rustls::TlsAcceptor::from(config).accept(stream).into_fallible().await {
        Ok(tls) => tls,
        Err((e, stream)) => {
            tracing::info!(peer = %address, "TLS handshake failed: {e}");
            linger_and_close(stream).await;
            return None;
        }
    };
    let (_, session) = tls.get_ref();
    let certificate = session.peer_certificates().and_then(<[_]>::first);
    let tls_client = certificate.and_then(crate::tls::certificate_identity);
    if certificate.is_some() && tls_client.is_none() {
        tracing::info!(
            peer = %address,
            "the client certificate names no usable identity (DNS subjectAltName or CN {}); its requests carry no \
             role/tls/ principal",
            crate::tls::IDENTITY_RULE
        );
    }
    tracing::debug!(peer = %address, version = ?session.protocol_version(), tls_client = tls_client.as_deref(), "TLS handshake done");
    Some(TcpConnection::Tls(Box::new(tls), tls_client))
}

/// Closes a connection whose last words (a TLS alert, a 400) were written, so that the
/// client reads them: a close with unread data would reset the connection first, and the
/// client would see only "connection reset" where rustls's alert says why.
async fn linger_and_close(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if tokio::time::timeout(Duration::from_secs(2), stream.shutdown()).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let drain = async { while let Ok(1..) = stream.read(&mut buf).await {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The largest plain HTTP request head read from a TLS port before answering it.
const PLAIN_HEAD_LIMIT: usize = 16 * 1024;

/// Answers plain HTTP sent to a TLS port with one `400` in AWS's JSON 1.1 error shape that
/// says so, then closes. Nothing in the request is served.
async fn refuse_plain_http(mut stream: tokio::net::TcpStream, address: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Read the request's head first: closing with unread data would reset the connection
    // before the client reads the answer.
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while head.len() < PLAIN_HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let host = plain_http_host(&head).or_else(|| stream.local_addr().ok().map(|a| a.to_string()));
    let url = host.map_or_else(|| "https://".to_string(), |h| format!("https://{h}"));
    tracing::info!(peer = %address, "plain HTTP on the TLS port refused: the client must use {url}");
    let message = format!("This port speaks TLS (HTTPS), not plain HTTP: use {url} as the endpoint");
    let error = KmsError::new(ErrorKind::ValidationException, message);
    let body = serde_json::to_vec(&error.to_wire()).unwrap_or_default();
    let reply = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-ErrorType: {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        error.kind.as_str(),
        body.len()
    );
    let written = async {
        stream.write_all(reply.as_bytes()).await?;
        stream.write_all(&body).await
    };
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), written).await {
        linger_and_close(stream).await;
    }
}

/// The `Host` header of a plain HTTP request head, if it is a plausible host and port.
fn plain_http_host(head: &[u8]) -> Option<String> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(head.len());
    let text = String::from_utf8_lossy(&head[..end]);
    let value = text.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("host").then(|| value.trim())
    })?;
    let plausible = !value.is_empty()
        && value.len() <= 255
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    plausible.then(|| value.to_string())
}

fn serve_connection<S>(
    http: &hyper::server::conn::http1::Builder,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    shared: &Arc<Shared>,
    peer: Peer,
    stream: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shared = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let (shared, peer) = (shared.clone(), peer.clone());
        async move { Ok::<_, Infallible>(respond(shared, &peer, req).await) }
    });
    let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection ended: {e}");
        }
    });
}

/// What every connection shares.
struct Shared {
    agent: Arc<Agent>,
    audit: Option<Arc<AuditLog>>,
    stats: Stats,
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// Requests served since start, by action and outcome.
struct Stats {
    started: Instant,
    counts: Mutex<BTreeMap<String, [u64; 2]>>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats { started: Instant::now(), counts: Mutex::new(BTreeMap::new()) }
    }
}

impl Stats {
    fn record(&self, action: &str, ok: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match counts.get_mut(action) {
            Some(c) => c[usize::from(!ok)] += 1,
            None => {
                counts.insert(action.to_string(), if ok { [1, 0] } else { [0, 1] });
            }
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let requests: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|(action, [ok, err])| (action.clone(), serde_json::json!({"Ok": ok, "Errors": err})))
            .collect();
        serde_json::json!({"UptimeSeconds": self.started.elapsed().as_secs_f64(), "Requests": requests})
    }
}

type Body = Either<Full<Bytes>, Channel<Bytes>>;

/// Answers one request and audits it: the reply goes out only once its record is durable.
async fn respond(shared: Arc<Shared>, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let Some(audit) = shared.audit.clone() else {
        let (response, outcome) = answer(&shared, peer, req, &request_id, false).await;
        note_usage(&shared.agent, &outcome.name, &outcome.used_keys, &request_id, &uuid::Uuid::new_v4().to_string());
        return response;
    };
    if !audit.accepting() {
        tracing::warn!("request refused before it was read: the audit trail cannot be written");
        return error_response(&AuditLog::refusal(), &request_id, false).map(Either::Left);
    }
    let time_ms = kmsfs_common::time::now_millis();
    let header = |name| req.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
    let (user_agent, authorization) = (header(USER_AGENT), header(AUTHORIZATION));
    let (response, mut outcome) = answer(&shared, peer, req, &request_id, true).await;
    let (user_identity, source_address) = match peer {
        Peer::Kernel(_, recorded) => ((**recorded).clone(), audit_event::source_address(None)),
        Peer::SigV4(remote) => {
            let mut identity =
                outcome.identity.unwrap_or_else(|| audit_event::unauthenticated_identity(authorization.as_deref()));
            audit_event::add_tls_client(&mut identity, remote.tls_client.as_deref(), &shared.agent.scope.account);
            (identity, audit_event::source_address(remote.address))
        }
    };
    let scope = &shared.agent.scope;
    let (used_keys, name) = (std::mem::take(&mut outcome.used_keys), outcome.name.clone());
    let record = audit_event::Record {
        time_ms,
        event_source: outcome.source,
        event_name: &outcome.name,
        region: &scope.region,
        account: &scope.account,
        user_identity,
        source_address,
        user_agent,
        request_id: &request_id,
        read_only: !outcome.mutation,
        inspected: outcome.inspected,
        response_elements: outcome.response_elements,
        error: outcome.error.as_ref(),
    };
    let event = record.into_event();
    let event_id = event.get("eventID").and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
    match audit.append(event, outcome.seal, outcome.mutation).await {
        Ok(()) => {
            note_usage(&shared.agent, &name, &used_keys, &request_id, &event_id);
            response
        }
        Err(e) => error_response(&e, &request_id, false).map(Either::Left),
    }
}

/// What the audit record of an answered request says beyond the request itself.
struct Outcome {
    /// `eventName`: the action, or the raw target if it names none.
    name: String,
    source: &'static str,
    /// `userIdentity` of a TCP caller, once authenticated.
    identity: Option<serde_json::Value>,
    inspected: Inspected,
    response_elements: serde_json::Value,
    /// `errorCode` and `errorMessage`.
    error: Option<(String, String)>,
    /// The action changes state (so it is not read-only, and its record may use the reserve).
    mutation: bool,
    /// Seal the log right after this record.
    seal: bool,
    /// Keys a successful cryptographic operation used, for GetKeyLastUsage.
    used_keys: Vec<kmsfs_common::ids::KeyId>,
}

/// Records the keys a successful cryptographic operation used (GetKeyLastUsage), once its
/// audit record (`event_id`) is durable.
fn note_usage(agent: &Agent, action: &str, used: &[kmsfs_common::ids::KeyId], request_id: &str, event_id: &str) {
    let operation = match action {
        service::GENERATE_DATA_KEYS => "GenerateDataKey",
        name => name,
    };
    for key in used {
        agent.note_usage(*key, operation, request_id, event_id);
    }
}

impl Outcome {
    fn new(name: String, source: &'static str) -> Outcome {
        Outcome {
            name,
            source,
            identity: None,
            inspected: Inspected::default(),
            response_elements: serde_json::Value::Null,
            error: None,
            mutation: false,
            seal: false,
            used_keys: Vec::new(),
        }
    }

    fn failed(mut self, e: &KmsError) -> Outcome {
        self.error = Some((e.kind.as_str().to_string(), e.message.clone()));
        self
    }
}

const KMS_SOURCE: &str = "kms.amazonaws.com";
const STS_SOURCE: &str = "sts.amazonaws.com";
const KMSD_SOURCE: &str = "kmsd";

/// Answers a request; `audited` also reads its body for the record.
async fn answer(
    shared: &Arc<Shared>,
    peer: &Peer,
    req: Request<Incoming>,
    request_id: &str,
    audited: bool,
) -> (Response<Body>, Outcome) {
    let raw_target = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (target, parts, body) = match read_request(req, matches!(peer, Peer::SigV4(..))).await {
        Ok(read) => read,
        Err(early) => {
            let name = raw_target.strip_prefix("TrentService.").unwrap_or(&raw_target);
            let name = if name.is_empty() { "Unknown".to_string() } else { name.chars().take(128).collect() };
            let outcome = Outcome::new(name, KMS_SOURCE).failed(&early.error);
            return (early.into_response(request_id).map(Either::Left), outcome);
        }
    };
    let action = target.name().to_string();
    let source = match &target {
        Target::Kms(action) if action.starts_with(service::replicas::PEER_PREFIX) => KMSD_SOURCE,
        Target::Kms(_) => KMS_SOURCE,
        Target::Sts => STS_SOURCE,
        Target::Extension(_) => KMSD_SOURCE,
    };
    let mut outcome = Outcome::new(action.clone(), source);
    let caller = match peer {
        Peer::Kernel(caller, _) => caller.clone(),
        Peer::SigV4(remote) => match authenticate(&shared.agent, remote, &target, &parts, &body) {
            Ok(key) => {
                outcome.identity = Some(audit_event::access_key_identity(&key.arn, &key.access_key_id, &key.caller));
                if matches!(target, Target::Sts) {
                    let (response, requested) = sts_response(shared, &action, &key, &body, request_id);
                    outcome.name = requested.chars().take(128).collect();
                    if response.status() != StatusCode::OK {
                        outcome.error = Some(("InvalidAction".into(), format!("STS {} is not served", outcome.name)));
                    }
                    return (response.map(Either::Left), outcome);
                }
                match &remote.tls_client {
                    Some(identity) => {
                        let mut caller = (*key.caller).clone();
                        caller.tls_client = Some(identity.clone());
                        Arc::new(caller)
                    }
                    None => key.caller.clone(),
                }
            }
            Err(e) => {
                shared.stats.record(&action, false);
                let message = e.message();
                tracing::info!(%action, error = e.json_code(), "request not authenticated: {message}");
                outcome.error = Some((e.json_code().to_string(), message.clone()));
                let response = match target {
                    Target::Sts => sts_error(StatusCode::FORBIDDEN, e.query_code(), &message, request_id),
                    _ => error_response(&e.to_error(), request_id, false),
                };
                return (response.map(Either::Left), outcome);
            }
        },
    };
    let caller = &caller;
    if audited && !matches!(target, Target::Sts) {
        outcome.inspected = audit_event::inspect_request(&shared.agent, &body);
    }
    let result = match target {
        // Answered above, once authenticated; the Unix socket never reads a request as STS.
        Target::Sts => Err(KmsError::new(ErrorKind::UnknownOperationException, "STS is served on TCP only")),
        Target::Kms(_) | Target::Extension(Extension::GenerateDataKeys) => {
            outcome.mutation = service::mutates(&action);
            run(shared.agent.clone(), caller.clone(), action.clone(), body).await.map(|reply| {
                outcome.used_keys = service::used_keys(&action, reply.public_body());
                if audited {
                    outcome.response_elements = audit_event::response_elements(outcome.mutation, reply.public_body());
                    outcome.inspected.resources.extend(audit_event::reply_resources(reply.public_body()));
                }
                reply.to_bytes()
            })
        }
        // Key state changes (IDs and states, nothing secret) go to anyone who holds data
        // keys: every kmsfs mount must learn of a revocation, whoever runs it.
        Target::Extension(Extension::WatchKeyEvents) => {
            shared.stats.record(&action, true);
            tracing::debug!(user = %caller.user, "key event watcher subscribed");
            return (watch_key_events(shared, request_id), outcome);
        }
        // Request counts are the administrators' business, as DescribeKey is.
        Target::Extension(Extension::GetAgentStats) => shared
            .agent
            .authorize_account(caller, "DescribeKey", |c| c)
            .map(|()| zeroize::Zeroizing::new(serde_json::to_vec(&shared.stats.to_json()).unwrap_or_default())),
        // So is the audit trail's whereabouts (its public key is no secret).
        Target::Extension(Extension::GetAuditInfo) => {
            shared.agent.authorize_account(caller, "DescribeKey", |c| c).map(|()| {
                outcome.seal = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("Seal")?.as_bool())
                    .unwrap_or(false);
                zeroize::Zeroizing::new(serde_json::to_vec(&audit_info(shared.audit.as_deref())).unwrap_or_default())
            })
        }
    };
    shared.stats.record(&action, result.is_ok());
    let response = match result {
        Ok(body) => {
            tracing::debug!(%action, user = %caller.user, uid = caller.uid, "ok");
            let len = body.len();
            let mut response = Response::new(Full::new(Bytes::from_owner(body)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-amz-json-1.1"));
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
            insert_request_id(&mut response, request_id);
            response.map(Either::Left)
        }
        Err(e) => {
            tracing::info!(%action, user = %caller.user, uid = caller.uid, unit = caller.unit.as_deref(), error = %e.kind, "request failed");
            outcome = outcome.failed(&e);
            error_response(&e, request_id, false).map(Either::Left)
        }
    };
    (response, outcome)
}

/// `Kmsfs.GetAuditInfo`'s answer.
fn audit_info(audit: Option<&AuditLog>) -> serde_json::Value {
    match audit {
        Some(log) => serde_json::json!({
            "Enabled": true,
            "Directory": log.directory().to_string_lossy(),
            "PublicKey": kmsfs_common::audit::encode_public_key(log.public_key()),
            "PublicKeyFingerprint": kmsfs_common::audit::key_fingerprint(log.public_key()),
        }),
        None => serde_json::json!({"Enabled": false}),
    }
}

/// How often an idle event stream carries a heartbeat, so that clients notice a dead
/// agent by a read timeout.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Streams key state changes as JSON lines, after a first `Subscribed` line, until the
/// client goes away or the agent stops. A watcher that falls behind by more than the
/// channel's capacity gets a `Lagged` line and should treat every cached key as stale.
fn watch_key_events(shared: &Shared, request_id: &str) -> Response<Body> {
    let mut events = shared.agent.subscribe();
    let mut stopping = shared.stopping.clone();
    let agent = shared.agent.clone();
    let (mut tx, body) = Channel::<Bytes>::new(16);
    tokio::spawn(async move {
        let line = |v: serde_json::Value| Bytes::from(format!("{v}\n"));
        if tx.send_data(line(serde_json::json!({"Event": "Subscribed"}))).await.is_err() {
            return;
        }
        loop {
            let next = tokio::select! {
                event = events.recv() => match event {
                    Ok(KeyEvent { key_id, state }) => serde_json::json!({
                        "Event": "KeyStateChanged",
                        "KeyId": key_id.to_string(),
                        "KeyArn": agent.key_arn(&key_id),
                        "KeyState": state.map_or("Deleted", |s| s.as_str()),
                    }),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        serde_json::json!({"Event": "Lagged", "Missed": n})
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                () = tokio::time::sleep(HEARTBEAT) => serde_json::json!({"Event": "Heartbeat"}),
                _ = stopping.changed() => return,
            };
            if tx.send_data(line(next)).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(Either::Right(body));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-amzn-requestid", v);
    }
    response
}

/// What a request asks for: an AWS KMS action, or one of kmsd's extensions.
enum Target {
    Kms(String),
    Extension(Extension),
    /// An AWS query-protocol request to STS (TCP only).
    Sts,
}

enum Extension {
    GenerateDataKeys,
    WatchKeyEvents,
    GetAgentStats,
    GetAuditInfo,
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Kms(action) => action,
            Target::Extension(Extension::GenerateDataKeys) => service::GENERATE_DATA_KEYS,
            Target::Extension(Extension::WatchKeyEvents) => "Kmsfs.WatchKeyEvents",
            Target::Extension(Extension::GetAgentStats) => "Kmsfs.GetAgentStats",
            Target::Extension(Extension::GetAuditInfo) => "Kmsfs.GetAuditInfo",
            Target::Sts => "STS",
        }
    }
}

/// Runs the action: inline if it only reads memory, on the blocking pool if it commits
/// to the store or is a batch. The request body is zeroized once handled.
async fn run(agent: Arc<Agent>, caller: Arc<Caller>, action: String, body: Bytes) -> Result<service::Reply, KmsError> {
    let blocking = service::blocking(&action);
    let work = move || {
        let result = service::handle(&agent, &caller, &action, &body);
        if let Ok(mut owned) = body.try_into_mut() {
            owned.as_mut().zeroize();
        }
        result
    };
    if !blocking {
        return work();
    }
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(KmsError::internal(format!("the request's worker failed: {e}"))))
}

/// Why a request was answered before reaching a handler.
struct Early {
    error: KmsError,
    close: bool,
}

impl Early {
    fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        error_response(&self.error, request_id, self.close)
    }
}

/// Reads a request's target and body; `query` allows STS's query protocol (no
/// `X-Amz-Target`), which only the TCP listener serves.
async fn read_request(
    req: Request<Incoming>,
    query: bool,
) -> Result<(Target, hyper::http::request::Parts, Bytes), Early> {
    let early = |kind, message: &str| Early { error: KmsError::new(kind, message), close: false };
    if req.method() != Method::POST || req.uri().path() != "/" {
        return Err(early(
            ErrorKind::UnknownOperationException,
            "kmsd speaks AWS KMS's JSON 1.1 protocol: POST / with an X-Amz-Target header",
        ));
    }
    let header = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
    let target = match header {
        service::GENERATE_DATA_KEYS => Target::Extension(Extension::GenerateDataKeys),
        "Kmsfs.WatchKeyEvents" => Target::Extension(Extension::WatchKeyEvents),
        "Kmsfs.GetAgentStats" => Target::Extension(Extension::GetAgentStats),
        "Kmsfs.GetAuditInfo" => Target::Extension(Extension::GetAuditInfo),
        "" if query => Target::Sts,
        // Agents of other regions call these on the TCP listener only (multi-Region keys).
        peer if query && peer.starts_with(service::replicas::PEER_PREFIX) => Target::Kms(peer.to_string()),
        _ => match header.strip_prefix("TrentService.").filter(|a| !a.is_empty()) {
            Some(action) => Target::Kms(action.to_string()),
            None => {
                return Err(early(
                    ErrorKind::UnknownOperationException,
                    "Missing or unknown X-Amz-Target; expected TrentService.<Action>",
                ))
            }
        },
    };
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let too_large = || Early {
        error: KmsError::validation(format!("The request body exceeds the {MAX_BODY}-byte limit")),
        close: true,
    };
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                too_large()
            } else {
                Early {
                    error: KmsError::new(
                        ErrorKind::SerializationException,
                        format!("cannot read the request body: {e}"),
                    ),
                    close: true,
                }
            }
        })?
        .to_bytes();
    Ok((target, parts, body))
}

/// The access key a TCP request is signed with, by SigV4 for the agent's region and the
/// target's service; a key bound to a client certificate identity (`TlsClient`) only on a
/// connection whose client certificate has it.
fn authenticate(
    agent: &Agent,
    remote: &Remote,
    target: &Target,
    parts: &hyper::http::request::Parts,
    body: &[u8],
) -> Result<Arc<AccessKey>, Refusal> {
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let request = crate::sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body,
    };
    let service = if matches!(target, Target::Sts) { "sts" } else { "kms" };
    let expect = crate::sigv4::Expect { region: &agent.scope.region, service };
    let now = kmsfs_common::time::now_millis().div_euclid(1000);
    let current = remote.access_keys.current();
    let key = crate::sigv4::verify(&request, &expect, now, |id| current.get(id)).cloned().map_err(Refusal::Sig)?;
    match &key.tls_client {
        Some(bound) if remote.tls_client.as_ref() != Some(bound) => {
            tracing::info!(
                access_key_id = %key.access_key_id,
                bound_to = %bound,
                tls_client = remote.tls_client.as_deref(),
                peer = ?remote.address,
                "access key refused: it is bound to another TLS client certificate identity"
            );
            Err(Refusal::TlsClient(key.access_key_id.clone()))
        }
        _ => Ok(key),
    }
}

/// Why a TCP request did not authenticate.
enum Refusal {
    /// Its signature.
    Sig(crate::sigv4::SigError),
    /// Its access key (named) is bound to a client certificate identity this connection
    /// does not have.
    TlsClient(String),
}

impl Refusal {
    /// The JSON 1.1 error code.
    fn json_code(&self) -> &str {
        match self {
            Refusal::Sig(e) => e.json_code(),
            Refusal::TlsClient(_) => ErrorKind::UnrecognizedClientException.as_str(),
        }
    }

    /// STS's code for it (query protocol).
    fn query_code(&self) -> &str {
        match self {
            Refusal::Sig(e) => e.query_code(),
            Refusal::TlsClient(_) => "InvalidClientTokenId",
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::Sig(e) => e.message().to_string(),
            // The identity the key is bound to is the operator's business, not the caller's.
            Refusal::TlsClient(id) => format!(
                "The access key {id} is not valid on this connection: it is bound to a TLS client certificate \
                 this connection did not present"
            ),
        }
    }

    /// The refusal as a JSON 1.1 error.
    fn to_error(&self) -> KmsError {
        let kind = ErrorKind::from_wire(self.json_code()).unwrap_or(ErrorKind::InvalidSignatureException);
        KmsError::new(kind, self.message())
    }
}

const STS_NAMESPACE: &str = "https://sts.amazonaws.com/doc/2011-06-15/";

/// STS's one action here, `GetCallerIdentity`, in the query protocol's XML.
fn sts_response(
    shared: &Shared,
    action: &str,
    key: &AccessKey,
    body: &[u8],
    request_id: &str,
) -> (Response<Full<Bytes>>, String) {
    let form = String::from_utf8_lossy(body);
    let param = |name: &str| {
        form.split('&').find_map(|pair| {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode =
                |s: &str| String::from_utf8_lossy(&crate::sigv4::percent_decode(&s.replace('+', " "))).into_owned();
            (decode(n) == name).then(|| decode(v))
        })
    };
    let requested = param("Action").unwrap_or_default();
    if requested != "GetCallerIdentity" {
        shared.stats.record(action, false);
        let version = param("Version").unwrap_or_default();
        let message = format!(
            "Could not find operation {requested} for version {version}; kmsd serves only STS GetCallerIdentity"
        );
        return (sts_error(StatusCode::BAD_REQUEST, "InvalidAction", &message, request_id), requested);
    }
    shared.stats.record("STS.GetCallerIdentity", true);
    tracing::debug!(principal = %key.arn, "GetCallerIdentity");
    let xml = format!(
        "<GetCallerIdentityResponse xmlns=\"{STS_NAMESPACE}\">\n  <GetCallerIdentityResult>\n    \
         <Arn>{}</Arn>\n    <UserId>{}</UserId>\n    <Account>{}</Account>\n  </GetCallerIdentityResult>\n  \
         <ResponseMetadata>\n    <RequestId>{}</RequestId>\n  </ResponseMetadata>\n</GetCallerIdentityResponse>\n",
        xml_escape(&key.arn),
        xml_escape(&key.access_key_id),
        xml_escape(&key.caller.account),
        xml_escape(request_id)
    );
    (xml_response(StatusCode::OK, xml, request_id), requested)
}

/// An error in the query protocol's XML shape.
fn sts_error(status: StatusCode, code: &str, message: &str, request_id: &str) -> Response<Full<Bytes>> {
    let xml = format!(
        "<ErrorResponse xmlns=\"{STS_NAMESPACE}\">\n  <Error>\n    <Type>Sender</Type>\n    <Code>{}</Code>\n    \
         <Message>{}</Message>\n  </Error>\n  <RequestId>{}</RequestId>\n</ErrorResponse>\n",
        xml_escape(code),
        xml_escape(message),
        xml_escape(request_id)
    );
    xml_response(status, xml, request_id)
}

fn xml_response(status: StatusCode, xml: String, request_id: &str) -> Response<Full<Bytes>> {
    let len = xml.len();
    let mut response = Response::new(Full::new(Bytes::from(xml)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    response.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(len));
    insert_request_id(&mut response, request_id);
    response
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

fn insert_request_id(response: &mut Response<Full<Bytes>>, request_id: &str) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-amzn-requestid", v);
    }
}

/// An error in AWS's JSON 1.1 shape: HTTP 400 (500 for internal errors) with
/// `{"__type", "message"}`.
fn error_response(e: &KmsError, request_id: &str, close: bool) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&e.to_wire()).unwrap_or_default();
    let status = match e.kind {
        ErrorKind::KMSInternalException => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    let len = body.len();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-amz-json-1.1"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(e.kind.as_str()) {
        headers.insert("x-amzn-errortype", v);
    }
    if close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    insert_request_id(&mut response, request_id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_plain_http_names_the_https_endpoint_only_if_plausible() {
        let head =
            |host: &str| format!("POST / HTTP/1.1\r\nX-Amz-Target: a\r\nhost: {host}\r\n\r\n\u{fffd}body").into_bytes();
        assert_eq!(plain_http_host(&head("kms.example:4566")).as_deref(), Some("kms.example:4566"));
        assert_eq!(plain_http_host(&head("[::1]:4566")).as_deref(), Some("[::1]:4566"));
        assert_eq!(plain_http_host(&head("evil\u{1b}[2J")), None);
        assert_eq!(plain_http_host(&head("a b")), None);
        assert_eq!(plain_http_host(b"POST / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(plain_http_host(&[0xff, 0xfe, b'\r', b'\n']), None);
    }
}
