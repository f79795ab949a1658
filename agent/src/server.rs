//! The transport: AWS JSON 1.1 over HTTP/1.1 on a Unix socket.
//!
//! Each connection is served by hyper on the tokio runtime; the caller is identified by
//! the kernel (SO_PEERCRED) when the connection is accepted, never by the request. A
//! request is `POST /` with `X-Amz-Target: TrentService.<Action>`; bodies larger than
//! [`MAX_BODY`] are refused from their Content-Length, or as soon as they grow past it.
//! Actions that write to the store run on the blocking pool; the others run inline.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kmsfs_common::{ErrorKind, KmsError};
use tokio::net::UnixListener;
use zeroize::Zeroize;

use crate::agent::Agent;
use crate::service;

/// The largest request body accepted: room for a 128 KiB key policy with JSON escaping
/// (the model's largest member), far more than any cryptographic request needs.
pub const MAX_BODY: usize = 512 * 1024;

/// Who is calling, as the kernel reports it for the connection.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Until access control arrives, the agent serves its own user and root only.
#[derive(Clone, Copy)]
pub struct AccessRule {
    pub owner_uid: u32,
}

impl AccessRule {
    fn check(&self, agent: &Agent, caller: &Caller, action: &str) -> Result<(), KmsError> {
        if caller.uid == 0 || caller.uid == self.owner_uid {
            return Ok(());
        }
        let user = nix::unistd::User::from_uid(caller.uid.into())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| caller.uid.to_string());
        Err(KmsError::new(
            ErrorKind::AccessDeniedException,
            format!(
                "User: arn:aws:iam::{}:user/{user} is not authorized to perform: kms:{action} \
                 (this agent serves only uid {} and root until access control is configured)",
                agent.scope.account, self.owner_uid
            ),
        ))
    }
}

/// Serves `listener` until `shutdown` resolves, then lets requests in flight finish
/// (for up to 30 seconds) before returning.
pub async fn serve(
    agent: Arc<Agent>,
    rule: AccessRule,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
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
        let caller = match stream.peer_cred() {
            Ok(cred) => Caller { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() },
            Err(e) => {
                tracing::warn!("cannot read peer credentials, dropping connection: {e}");
                continue;
            }
        };
        let agent = agent.clone();
        let service = hyper::service::service_fn(move |req| {
            let agent = agent.clone();
            async move { Ok::<_, Infallible>(respond(agent, rule, caller, req).await) }
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
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections did not finish within 30 s");
    }
}

async fn respond(agent: Arc<Agent>, rule: AccessRule, caller: Caller, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let (action, result) = match read_request(req).await {
        Ok((action, body)) => {
            let result = match rule.check(&agent, &caller, &action) {
                Err(e) => Err(e),
                Ok(()) => run(agent, action.clone(), body).await,
            };
            (action, result)
        }
        Err(early) => return early.into_response(&request_id),
    };
    match result {
        Ok(body) => {
            tracing::debug!(%action, uid = caller.uid, pid = caller.pid, "ok");
            let len = body.len();
            let mut response = Response::new(Full::new(Bytes::from_owner(body)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-amz-json-1.1"));
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
            insert_request_id(&mut response, &request_id);
            response
        }
        Err(e) => {
            tracing::info!(%action, uid = caller.uid, pid = caller.pid, error = %e.kind, "request failed");
            error_response(&e, &request_id, false)
        }
    }
}

/// Runs the action: inline if it only reads memory, on the blocking pool if it commits
/// to the store. The request body is zeroized once handled.
async fn run(agent: Arc<Agent>, action: String, body: Bytes) -> Result<zeroize::Zeroizing<Vec<u8>>, KmsError> {
    let mutates = service::mutates(&action);
    let work = move || {
        let result = service::handle(&agent, &action, &body).map(|reply| reply.to_bytes());
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

async fn read_request(req: Request<Incoming>) -> Result<(String, Bytes), Early> {
    let early = |kind, message: &str| Early { error: KmsError::new(kind, message), close: false };
    if req.method() != Method::POST || req.uri().path() != "/" {
        return Err(early(
            ErrorKind::UnknownOperationException,
            "kmsd speaks AWS KMS's JSON 1.1 protocol: POST / with an X-Amz-Target header",
        ));
    }
    let target = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(action) = target.strip_prefix("TrentService.").filter(|a| !a.is_empty()) else {
        return Err(early(
            ErrorKind::UnknownOperationException,
            "Missing or unknown X-Amz-Target; expected TrentService.<Action>",
        ));
    };
    let action = action.to_string();
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
    Ok((action, body))
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
