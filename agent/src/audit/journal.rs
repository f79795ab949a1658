//! The optional mirror of every audit line to the systemd journal, as structured fields
//! (`KMSD_AUDIT_EVENT_NAME`, `KMSD_AUDIT_PRINCIPAL`, `KMSD_AUDIT_SEQUENCE`, `KMSD_AUDIT_HASH`,
//! ... and the whole line as `KMSD_AUDIT_RECORD`), sent in the journal's native protocol to
//! its datagram socket.
//!
//! The mirror is best effort and never holds a request: the files are the trail. It is an
//! external anchor, though — the journal keeps each line's sequence number and hash, so a
//! log cut after a digest, or whose last files were removed, disagrees with it.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

/// Where journald listens for native-protocol datagrams.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// A connection to the journal's socket.
pub struct Journal {
    socket: UnixDatagram,
    warned: AtomicBool,
}

impl Journal {
    pub fn connect(path: &Path) -> io::Result<Journal> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        // A journal that cannot keep up loses mirror entries rather than stalling the writer.
        socket.set_nonblocking(true)?;
        Ok(Journal { socket, warned: AtomicBool::new(false) })
    }

    /// Sends one audit line; a line too large for one datagram goes without its full text.
    pub fn send(&self, line: &[u8]) {
        let sent = self.socket.send(&entry(line, true)).or_else(|e| match e.raw_os_error() {
            Some(libc::EMSGSIZE) | Some(libc::ENOBUFS) => self.socket.send(&entry(line, false)),
            _ => Err(e),
        });
        if let Err(e) = sent {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!("cannot mirror audit records to the journal ({e}); the audit files are complete");
            }
        }
    }
}

/// The native-protocol datagram for one audit line: `NAME=value\n` fields, or for a value
/// holding a newline `NAME\n` + its length (u64, little-endian) + value + `\n`.
pub fn entry(line: &[u8], with_record: bool) -> Vec<u8> {
    let record: Value = serde_json::from_slice(line).unwrap_or(Value::Null);
    let text = |v: &Value| v.as_str().map(str::to_string);
    let mut fields: Vec<(&str, String)> = vec![("SYSLOG_IDENTIFIER", "kmsd-audit".into())];
    let sequence = record["sequence"].as_u64().map(|s| s.to_string()).unwrap_or_default();
    fields.push(("KMSD_AUDIT_SEQUENCE", sequence.clone()));
    fields.push(("KMSD_AUDIT_HASH", kmsfs_common::audit::line_hash(line)));
    if record["eventType"] == kmsfs_common::audit::DIGEST_EVENT_TYPE {
        fields.push(("PRIORITY", "6".into()));
        fields.push(("KMSD_AUDIT_EVENT_TYPE", "Digest".into()));
        let span = format!("{}..{}", record["firstSequence"], record["lastSequence"]);
        fields.push(("MESSAGE", format!("audit digest {sequence}: records {span} sealed")));
    } else {
        let name = text(&record["eventName"]).unwrap_or_default();
        let principal = text(&record["userIdentity"]["arn"])
            .or_else(|| text(&record["userIdentity"]["accessKeyId"]))
            .unwrap_or_else(|| "unknown".into());
        let error = text(&record["errorCode"]);
        let outcome = error.clone().unwrap_or_else(|| "OK".into());
        fields.push(("PRIORITY", if error.is_some() { "5" } else { "6" }.into()));
        fields.push(("MESSAGE", format!("audit {sequence}: {name} by {principal}: {outcome}")));
        fields.push(("KMSD_AUDIT_EVENT_TYPE", "AwsApiCall".into()));
        fields.push(("KMSD_AUDIT_EVENT_NAME", name));
        fields.push(("KMSD_AUDIT_PRINCIPAL", principal));
        fields.push(("KMSD_AUDIT_OUTCOME", outcome));
        for (field, member) in [
            ("KMSD_AUDIT_EVENT_ID", "eventID"),
            ("KMSD_AUDIT_REQUEST_ID", "requestID"),
            ("KMSD_AUDIT_EVENT_TIME", "eventTime"),
            ("KMSD_AUDIT_SOURCE_IP", "sourceIPAddress"),
        ] {
            if let Some(value) = text(&record[member]) {
                fields.push((field, value));
            }
        }
        if let Some(arn) = text(&record["resources"][0]["ARN"]) {
            fields.push(("KMSD_AUDIT_KEY_ARN", arn));
        }
        if let Some(uid) = record["userIdentity"]["uid"].as_u64() {
            fields.push(("KMSD_AUDIT_UID", uid.to_string()));
        }
    }
    if with_record {
        fields.push(("KMSD_AUDIT_RECORD", String::from_utf8_lossy(line).into_owned()));
    }
    let mut out = Vec::new();
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_the_line_its_hash_and_who_did_what() {
        let line = br#"{"eventName":"Decrypt","errorCode":"AccessDeniedException","sequence":7,"userIdentity":{"arn":"arn:aws:iam::1:user/a","uid":5},"resources":[{"ARN":"arn:k"}]}"#;
        let text = String::from_utf8(entry(line, true)).unwrap();
        for field in [
            "KMSD_AUDIT_EVENT_NAME=Decrypt\n",
            "KMSD_AUDIT_OUTCOME=AccessDeniedException\n",
            "KMSD_AUDIT_SEQUENCE=7\n",
            "KMSD_AUDIT_KEY_ARN=arn:k\n",
            "KMSD_AUDIT_UID=5\n",
            "PRIORITY=5\n",
            "MESSAGE=audit 7: Decrypt by arn:aws:iam::1:user/a: AccessDeniedException\n",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        assert!(text.contains(&format!("KMSD_AUDIT_HASH={}\n", kmsfs_common::audit::line_hash(line))));
        assert!(text.ends_with(&format!("KMSD_AUDIT_RECORD={}\n", String::from_utf8_lossy(line))));
        assert!(!String::from_utf8(entry(line, false)).unwrap().contains("KMSD_AUDIT_RECORD"));
    }
}
