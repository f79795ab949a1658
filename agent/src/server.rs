//! The transport: AWS JSON 1.1 over HTTP/1.1 on a Unix socket.
//!
//! Each connection is served by hyper on the tokio runtime; the caller is identified by
//! the kernel (SO_PEERCRED) when the connection is accepted, never by the request. A
//! request is `POST /` with `X-Amz-Target: TrentService.<Action>`; bodies larger than
//! [`MAX_BODY`] are refused from their Content-Length, or as soon as they grow past it.
//! Actions that write to the store run on the blocking pool; the others run inline.
//!
//! Beyond AWS's `TrentService`, two kmsd extensions share the socket under the `Kmsfs.`
//! target prefix: `Kmsfs.WatchKeyEvents` streams key state changes as JSON lines (kmsfs
//! drops cached data keys of a key the moment it is disabled), and `Kmsfs.GetAgentStats`
//! reports request counts per action.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Channel, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kmsfs_common::{ErrorKind, KmsError};
use tokio::net::UnixListener;
use zeroize::Zeroize;

use crate::agent::{Agent, KeyEvent};
use crate::authz::Authz;
use crate::identity::identify;
use crate::policy::eval::Caller;
use crate::service;

/// The largest request body accepted: room for a 128 KiB key policy with JSON escaping
/// (the model's largest member), far more than any cryptographic request needs.
pub const MAX_BODY: usize = 512 * 1024;

/// Serves `listener` until `shutdown` resolves, then lets requests in flight finish
/// (for up to 30 seconds) before returning.
pub async fn serve(agent: Arc<Agent>, listener: UnixListener, shutdown: impl std::future::Future<Output = ()>) {
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared { agent, stats: Stats::default(), stopping });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true).timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let caller = match identify(&stream) {
            Ok(identity) => Arc::new(Authz::caller(&identity, &shared.agent.scope.account)),
            Err(e) => {
                tracing::warn!("cannot read peer credentials, dropping connection: {e}");
                continue;
            }
        };
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |req| {
            let (shared, caller) = (shared.clone(), caller.clone());
            async move { Ok::<_, Infallible>(respond(shared, &caller, req).await) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing requests in flight");
    // Event streams never finish on their own: end them so their connections can close.
    let _ = stopping_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections did not finish within 30 s");
    }
}

/// What every connection shares.
struct Shared {
    agent: Arc<Agent>,
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

async fn respond(shared: Arc<Shared>, caller: &Arc<Caller>, req: Request<Incoming>) -> Response<Body> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let (target, body) = match read_request(req).await {
        Ok(read) => read,
        Err(early) => return early.into_response(&request_id).map(Either::Left),
    };
    let action = target.name().to_string();
    let result = match target {
        Target::Kms(action) => run(shared.agent.clone(), caller.clone(), action, body).await,
        // Key state changes (IDs and states, nothing secret) go to anyone who holds data
        // keys: every kmsfs mount must learn of a revocation, whoever runs it.
        Target::Extension(Extension::WatchKeyEvents) => {
            shared.stats.record(&action, true);
            tracing::debug!(user = %caller.user, "key event watcher subscribed");
            return watch_key_events(&shared, &request_id);
        }
        // Request counts are the administrators' business, as DescribeKey is.
        Target::Extension(Extension::GetAgentStats) => shared
            .agent
            .authorize_account(caller, "DescribeKey", |c| c)
            .map(|()| zeroize::Zeroizing::new(serde_json::to_vec(&shared.stats.to_json()).unwrap_or_default())),
    };
    shared.stats.record(&action, result.is_ok());
    match result {
        Ok(body) => {
            tracing::debug!(%action, user = %caller.user, uid = caller.uid, "ok");
            let len = body.len();
            let mut response = Response::new(Full::new(Bytes::from_owner(body)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-amz-json-1.1"));
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
            insert_request_id(&mut response, &request_id);
            response.map(Either::Left)
        }
        Err(e) => {
            tracing::info!(%action, user = %caller.user, uid = caller.uid, unit = caller.unit.as_deref(), error = %e.kind, "request failed");
            error_response(&e, &request_id, false).map(Either::Left)
        }
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
                        "KeyState": state.as_str(),
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
}

enum Extension {
    WatchKeyEvents,
    GetAgentStats,
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Kms(action) => action,
            Target::Extension(Extension::WatchKeyEvents) => "Kmsfs.WatchKeyEvents",
            Target::Extension(Extension::GetAgentStats) => "Kmsfs.GetAgentStats",
        }
    }
}

/// Runs the action: inline if it only reads memory, on the blocking pool if it commits
/// to the store. The request body is zeroized once handled.
async fn run(
    agent: Arc<Agent>,
    caller: Arc<Caller>,
    action: String,
    body: Bytes,
) -> Result<zeroize::Zeroizing<Vec<u8>>, KmsError> {
    let mutates = service::mutates(&action);
    let work = move || {
        let result = service::handle(&agent, &caller, &action, &body).map(|reply| reply.to_bytes());
        if let Ok(mut owned) = body.try_into_mut() {
            owned.as_mut().zeroize();
        }
        result
    };
    if !mutates {
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

async fn read_request(req: Request<Incoming>) -> Result<(Target, Bytes), Early> {
    let early = |kind, message: &str| Early { error: KmsError::new(kind, message), close: false };
    if req.method() != Method::POST || req.uri().path() != "/" {
        return Err(early(
            ErrorKind::UnknownOperationException,
            "kmsd speaks AWS KMS's JSON 1.1 protocol: POST / with an X-Amz-Target header",
        ));
    }
    let header = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
    let target = match header {
        "Kmsfs.WatchKeyEvents" => Target::Extension(Extension::WatchKeyEvents),
        "Kmsfs.GetAgentStats" => Target::Extension(Extension::GetAgentStats),
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
    let body = Limited::new(req.into_body(), MAX_BODY)
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
    Ok((target, body))
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
