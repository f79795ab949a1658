//! Peer agents: the kmsd instances of other regions (hosts) that hold replicas of this
//! agent's multi-Region keys, and the client kmsd calls them with.
//!
//! `<config-dir>/peers.json` names each peer by the region it serves:
//!
//! ```json
//! {"Peers": [
//!   {"Region": "eu-west-1", "Endpoint": "https://10.0.0.2:4566", "CaFile": "/etc/kmsd/peers/ca.pem",
//!    "AccessKeyId": "AKIAREGIONAPEER00001", "SecretAccessKey": "...",
//!    "ClientCertificateFile": "/etc/kmsd/tls/host-a.pem", "ClientKeyFile": "/etc/kmsd/tls/host-a.key",
//!    "Principal": "user/eu-west-1-agent"}
//! ]}
//! ```
//!
//! `Principal` is who that peer's agent is when it calls this one (its access key's
//! `user/…` or `role/…` in this agent's `access-keys.json`, its client certificate's
//! `role/tls/<identity>`, or a full ARN). A peer action is served only to a caller that is
//! some peer's principal, and only as that peer's region may ask: a replica takes material
//! and configuration from its primary's agent alone. Without `Principal`, that peer can be
//! called but cannot call.
//!
//! The endpoint must be `https://`: key material crosses to a peer only over TLS, verified
//! against `CaFile` (and the peer's name or address in its certificate), and inside that
//! only wrapped for the receiving agent (see `service::replicas`). Requests are SigV4-signed
//! with the access key, which the peer maps to a principal in its own `access-keys.json`;
//! the client certificate, when given, is presented for mutual TLS. The file holds secrets:
//! like `access-keys.json` it must not be accessible to group or others. It is read at start
//! and on SIGHUP; a file that does not load leaves the previous peers in force.
//!
//! The client is deliberately small and blocking: one HTTP/1.1 request per connection,
//! made from the blocking pool (handlers, the scheduler), with connect and read timeouts,
//! so a peer that is down or hangs costs a bounded wait and never an executor thread.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kmsfs_common::ids::ArnScope;
use kmsfs_common::{ErrorKind, KmsError};
use rustls::pki_types::ServerName;
use serde::Deserialize;
use serde_json::Value;
use zeroize::Zeroizing;

/// The file's name in the configuration directory.
pub const FILE_NAME: &str = "peers.json";

/// How long a peer has to accept a connection, and then to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest response read from a peer.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct FileDoc {
    peers: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct Entry {
    region: String,
    endpoint: String,
    ca_file: PathBuf,
    access_key_id: String,
    secret_access_key: String,
    client_certificate_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    principal: Option<String>,
}

/// One peer agent.
pub struct Peer {
    pub region: String,
    /// `host:port`, as in the endpoint.
    authority: String,
    host: String,
    port: u16,
    access_key_id: String,
    secret: Zeroizing<String>,
    tls: Arc<rustls::ClientConfig>,
    /// The ARN the peer's agent calls this one as.
    principal: Option<String>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("region", &self.region).field("endpoint", &self.authority).finish()
    }
}

/// The loaded peers, by region; replaced whole on reload.
#[derive(Default)]
pub struct Peers {
    by_region: RwLock<Arc<BTreeMap<String, Arc<Peer>>>>,
}

impl Peers {
    /// Reads `<config_dir>/peers.json` (absent: no peers).
    pub fn load(config_dir: Option<&Path>, scope: &ArnScope) -> Result<Peers, String> {
        let peers = Peers::default();
        peers.reload(config_dir, scope)?;
        Ok(peers)
    }

    /// Re-reads the file; on error the previous peers stay. Returns how many are loaded.
    pub fn reload(&self, config_dir: Option<&Path>, scope: &ArnScope) -> Result<usize, String> {
        let Some(dir) = config_dir else { return Ok(0) };
        let loaded = read_file(&dir.join(FILE_NAME), &scope.region, &scope.account)?;
        let n = loaded.len();
        *self.by_region.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(n)
    }

    /// The region of the peer whose agent `caller` is, if it is one.
    pub fn region_of(&self, caller: &crate::policy::eval::Caller) -> Option<String> {
        let arns = caller.principal_arns();
        let peers = self.by_region.read().unwrap_or_else(|p| p.into_inner()).clone();
        peers.values().find(|p| p.principal.as_ref().is_some_and(|arn| arns.contains(arn))).map(|p| p.region.clone())
    }

    /// The peer serving `region`, or the error AWS gives for a region it cannot reach.
    pub fn get(&self, region: &str) -> Result<Arc<Peer>, KmsError> {
        self.by_region.read().unwrap_or_else(|p| p.into_inner()).get(region).cloned().ok_or_else(|| {
            KmsError::new(
                ErrorKind::UnsupportedOperationException,
                format!("Region {region} is not a peer of this agent: name its agent in {FILE_NAME}"),
            )
        })
    }
}

fn read_file(path: &Path, own_region: &str, account: &str) -> Result<BTreeMap<String, Arc<Peer>>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is accessible to group or others (mode {:04o}); it holds peers' secret access keys, so kmsd \
             refuses it: chmod 600 {}",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        ));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?);
    parse(&text, own_region, account).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse(text: &str, own_region: &str, account: &str) -> Result<BTreeMap<String, Arc<Peer>>, String> {
    let doc: FileDoc = serde_json::from_str(text).map_err(|e| {
        format!("expected {{\"Peers\": [{{\"Region\", \"Endpoint\", \"CaFile\", \"AccessKeyId\", \"SecretAccessKey\"}}]}}: {e}")
    })?;
    let mut peers = BTreeMap::new();
    for (i, entry) in doc.peers.into_iter().enumerate() {
        let at = format!("peer {} ({})", i + 1, entry.region);
        if entry.region.is_empty() || entry.region == own_region {
            return Err(format!("{at}: the region must be another agent's, not this agent's own ({own_region})"));
        }
        let rest = entry
            .endpoint
            .strip_prefix("https://")
            .ok_or_else(|| format!("{at}: the endpoint must be https:// (key material crosses only over TLS)"))?;
        let authority = rest.trim_end_matches('/').to_string();
        let (host, port) =
            split_authority(&authority).ok_or_else(|| format!("{at}: the endpoint is not https://HOST:PORT"))?;
        let roots = crate::tls::load_roots(&entry.ca_file).map_err(|e| format!("{at}: {e}"))?;
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let tls = match (&entry.client_certificate_file, &entry.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = crate::tls::load_certs(cert).map_err(|e| format!("{at}: {e}"))?;
                let key = crate::tls::load_private_key(key).map_err(|e| format!("{at}: {e}"))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("{at}: the client certificate: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(format!("{at}: give both ClientCertificateFile and ClientKeyFile, or neither")),
        };
        if entry.access_key_id.is_empty() || entry.secret_access_key.is_empty() {
            return Err(format!("{at}: AccessKeyId and SecretAccessKey are required"));
        }
        let principal = match entry.principal.as_deref() {
            None => None,
            Some(arn) if arn.starts_with("arn:aws:iam::") => Some(arn.to_string()),
            Some(short @ ("user/" | "role/")) => return Err(format!("{at}: Principal {short} names nobody")),
            Some(short) if short.starts_with("user/") || short.starts_with("role/") => {
                Some(format!("arn:aws:iam::{account}:{short}"))
            }
            Some(other) => {
                return Err(format!("{at}: Principal {other} is not user/NAME, role/NAME or an arn:aws:iam:: ARN"))
            }
        };
        let peer = Peer {
            principal,
            region: entry.region.clone(),
            authority,
            host,
            port,
            access_key_id: entry.access_key_id,
            secret: Zeroizing::new(entry.secret_access_key),
            tls: Arc::new(tls),
        };
        if peers.insert(entry.region.clone(), Arc::new(peer)).is_some() {
            return Err(format!("{at}: region {} is named twice", entry.region));
        }
    }
    Ok(peers)
}

/// `host:port` or `[v6]:port`.
fn split_authority(authority: &str) -> Option<(String, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty() && !host.contains('/')).then(|| Some((host.to_string(), port.parse().ok()?)))?
}

impl Peer {
    /// Calls `target` (`TrentService.X` or one of kmsd's `Kmsfs.` peer actions) on the peer
    /// with `body`, returning its JSON reply. A service error comes back as that error; a
    /// peer that cannot be reached, refuses TLS or answers garbage is `KMSInternalException`
    /// naming the peer, never a panic.
    pub fn call(&self, target: &str, body: &Value) -> Result<Value, KmsError> {
        let unreachable = |why: String| {
            KmsError::internal(format!("the peer agent of region {} ({}) {why}", self.region, self.authority))
        };
        let body = Zeroizing::new(serde_json::to_vec(body).unwrap_or_default());
        let headers = vec![
            ("Host".to_string(), self.authority.clone()),
            ("Content-Type".to_string(), "application/x-amz-json-1.1".to_string()),
            ("X-Amz-Target".to_string(), target.to_string()),
        ];
        let request = crate::sigv4::Request { method: "POST", path: "/", query: "", headers: &headers, body: &body };
        let signer = crate::sigv4::Signer {
            access_key_id: &self.access_key_id,
            secret_access_key: self.secret.as_bytes(),
            region: &self.region,
            service: "kms",
        };
        let now = kmsfs_common::time::now_millis().div_euclid(1000);
        let (date, authorization) = crate::sigv4::sign(&request, &signer, now);
        let mut head = format!("POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (name, value) in headers.iter().chain([&("X-Amz-Date".to_string(), date)]) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Authorization: {authorization}\r\n\r\n"));

        let address = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| unreachable(format!("has no address: {e}")))?
            .next()
            .ok_or_else(|| unreachable("has no address".into()))?;
        let tcp = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)
            .map_err(|e| unreachable(format!("cannot be reached: {e}")))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))
            .and_then(|()| tcp.set_write_timeout(Some(READ_TIMEOUT)))
            .map_err(|e| unreachable(format!("cannot be reached: {e}")))?;
        let name =
            ServerName::try_from(self.host.clone()).map_err(|_| unreachable("has an invalid host name".into()))?;
        let connection = rustls::ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| unreachable(format!("cannot start TLS: {e}")))?;
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        let mut wire = Zeroizing::new(head.into_bytes());
        wire.extend_from_slice(&body);
        stream
            .write_all(&wire)
            .and_then(|()| stream.flush())
            .map_err(|e| unreachable(format!("refused the request: {e}")))?;
        let mut response = Zeroizing::new(Vec::new());
        let read = Read::by_ref(&mut stream).take(MAX_RESPONSE as u64 + 1).read_to_end(&mut response);
        // A peer that closes without TLS close_notify after a complete response is fine.
        if let Err(e) = read {
            if e.kind() != std::io::ErrorKind::UnexpectedEof || response.is_empty() {
                return Err(unreachable(format!("did not answer: {e}")));
            }
        }
        let (status, payload) = parse_response(&response).ok_or_else(|| unreachable("answered garbage".into()))?;
        let value: Value = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(payload).map_err(|_| unreachable("answered something other than JSON".into()))?
        };
        if status == 200 {
            return Ok(value);
        }
        let code = value.get("__type").and_then(Value::as_str).unwrap_or("");
        let code = code.rsplit('#').next().unwrap_or(code);
        let message = value.get("message").or_else(|| value.get("Message")).and_then(Value::as_str).unwrap_or("");
        let kind = ErrorKind::from_wire(code).unwrap_or(ErrorKind::KMSInternalException);
        Err(KmsError::new(kind, format!("the peer agent of region {}: {message}", self.region)))
    }
}

/// The status code and body of an HTTP/1.1 response read to its end.
fn parse_response(response: &[u8]) -> Option<(u16, &[u8])> {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&response[..split]).ok()?;
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let mut length = None;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>().ok()?);
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return None; // kmsd answers with a length; anything else is not a peer agent
        }
    }
    match length {
        Some(n) => body.get(..n).map(|b| (status, b)),
        None => Some((status, body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_and_garbage_does_not() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: x\r\n\r\n{}";
        assert_eq!(parse_response(ok), Some((200, &b"{}"[..])));
        let short = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 10\r\n\r\n{}";
        assert_eq!(parse_response(short), None, "cut short");
        for garbage in [&b""[..], b"HTTP/1.0 200 OK\r\n\r\n", b"\x16\x03\x01", b"HTTP/1.1 2x0 OK\r\n\r\n"] {
            assert_eq!(parse_response(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn endpoints_must_be_tls_and_regions_distinct() {
        let doc = |region: &str, endpoint: &str| {
            format!(
                r#"{{"Peers": [{{"Region": "{region}", "Endpoint": "{endpoint}", "CaFile": "/nonexistent",
                "AccessKeyId": "AKIA", "SecretAccessKey": "s"}}]}}"#
            )
        };
        let parse = |text: &str, region: &str| parse(text, region, "111122223333");
        let err = parse(&doc("region-b", "http://10.0.0.2:4566"), "region-a").unwrap_err();
        assert!(err.contains("https://"), "{err}");
        let err = parse(&doc("region-a", "https://10.0.0.2:4566"), "region-a").unwrap_err();
        assert!(err.contains("own"), "{err}");
        let err = parse(&doc("region-b", "https://10.0.0.2"), "region-a").unwrap_err();
        assert!(err.contains("HOST:PORT"), "{err}");
        let err = parse(&doc("region-b", "https://10.0.0.2:4566"), "region-a").unwrap_err();
        assert!(err.contains("/nonexistent"), "the CA file is read: {err}");
        assert_eq!(split_authority("[fd00::2]:4566"), Some(("fd00::2".to_string(), 4566)));
        assert_eq!(split_authority("host-b:443"), Some(("host-b".to_string(), 443)));
    }
}
