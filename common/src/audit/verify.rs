//! Offline verification of a run of audit log files with only the files and the trusted
//! public key: the hash chain, the sequence numbers, every digest's signature and span, and
//! that every file ends with a digest. Stops at the first problem and names its place
//! (file, line, sequence number) and kind — modified, inserted, deleted, reordered,
//! truncated, a bad or foreign signature.

use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::{Map, Value};

use super::{key_fingerprint, line_hash, DigestFields, DIGEST_EVENT_TYPE, GENESIS_HASH};

/// What is wrong at a place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// A line's content changed (or is no record at all).
    Modified,
    /// A line that the chain does not account for.
    Inserted,
    /// Lines are missing.
    Deleted,
    /// Lines are out of order.
    Reordered,
    /// The end of the log is gone: a file ends with lines no digest covers, or mid-line.
    Truncated,
    /// A digest whose signature does not verify, or whose span does not match the lines.
    BadDigest,
    /// A digest signed by a key other than the trusted one.
    WrongKey,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Modified => "modified",
            Problem::Inserted => "inserted",
            Problem::Deleted => "deleted",
            Problem::Reordered => "reordered",
            Problem::Truncated => "truncated",
            Problem::BadDigest => "bad digest",
            Problem::WrongKey => "wrong key",
        }
    }
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: String,
    /// 1-based line number in `file`.
    pub line: usize,
    pub sequence: Option<u64>,
    pub problem: Problem,
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.problem.as_str())?;
        if let Some(seq) = self.sequence {
            write!(f, " (sequence {seq})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// What a clean run covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub files: usize,
    pub events: u64,
    pub digests: u64,
    pub first_sequence: Option<u64>,
    pub last_sequence: Option<u64>,
    /// Whether the first line is the log's very first (so nothing before it could be missing).
    pub from_genesis: bool,
}

/// Where the previous line was and what it hashed to.
struct Last {
    file: String,
    line: usize,
    sequence: u64,
    hash: String,
    /// The hash of the line before it, to recognise a line slipped in between.
    before: Option<String>,
}

/// Checks files one after another, in log order.
pub struct Verifier {
    key: VerifyingKey,
    fingerprint: String,
    last: Option<Last>,
    /// First sequence number the next digest must cover.
    unsealed: Option<u64>,
    summary: Summary,
}

impl Verifier {
    pub fn new(key: VerifyingKey) -> Verifier {
        Verifier { key, fingerprint: key_fingerprint(&key), last: None, unsealed: None, summary: Summary::default() }
    }

    /// Checks the next file, `name` holding `bytes`.
    pub fn file(&mut self, name: &str, bytes: &[u8]) -> Result<(), Finding> {
        self.summary.files += 1;
        let finding = |line: usize, sequence: Option<u64>, problem, detail: String| Finding {
            file: name.to_string(),
            line,
            sequence,
            problem,
            detail,
        };
        if bytes.is_empty() {
            return Err(finding(1, None, Problem::Truncated, "the file is empty".into()));
        }
        let body = match bytes.strip_suffix(b"\n") {
            Some(body) => body,
            None => {
                let line = bytes.split(|&b| b == b'\n').count();
                return Err(finding(line, None, Problem::Truncated, "the file ends in the middle of a line".into()));
            }
        };
        let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
        let sequences: Vec<Option<u64>> =
            lines.iter().map(|l| serde_json::from_slice::<Value>(l).ok()?.get("sequence")?.as_u64()).collect();
        for (index, bytes) in lines.iter().enumerate() {
            let lineno = index + 1;
            let object = match serde_json::from_slice::<Value>(bytes) {
                Ok(Value::Object(o)) => o,
                _ => return Err(finding(lineno, None, Problem::Modified, "the line is not a JSON object".into())),
            };
            let (Some(sequence), Some(previous)) =
                (object.get("sequence").and_then(Value::as_u64), object.get("previousHash").and_then(Value::as_str))
            else {
                return Err(finding(lineno, None, Problem::Modified, "the line lacks sequence or previousHash".into()));
            };
            let hash = line_hash(bytes);
            match &self.last {
                None => {
                    if sequence == 0 && previous != GENESIS_HASH {
                        return Err(finding(
                            lineno,
                            Some(0),
                            Problem::Modified,
                            "the log's first line does not start the chain".into(),
                        ));
                    }
                    self.summary.from_genesis = sequence == 0;
                    self.summary.first_sequence = Some(sequence);
                    self.unsealed = Some(sequence);
                }
                Some(last) => {
                    let expected = last.sequence + 1;
                    if sequence < expected {
                        // A line that repeats a sequence number: if it chains to the line
                        // before the previous one, it is the previous line that was slipped in.
                        if sequence == last.sequence && last.before.as_deref() == Some(previous) {
                            return Err(Finding {
                                file: last.file.clone(),
                                line: last.line,
                                sequence: Some(last.sequence),
                                problem: Problem::Inserted,
                                detail: format!(
                                    "line {} of {name} chains to the line before it: this line was inserted",
                                    lineno
                                ),
                            });
                        }
                        return Err(finding(
                            lineno,
                            Some(sequence),
                            Problem::Inserted,
                            format!(
                                "sequence {sequence} comes after {}: this line was inserted or moved",
                                last.sequence
                            ),
                        ));
                    }
                    if sequence > expected {
                        if sequences.get(index + 1).copied().flatten() == Some(expected) {
                            return Err(finding(
                                lineno,
                                Some(sequence),
                                Problem::Reordered,
                                format!("sequence {sequence} comes before {expected}: lines were swapped"),
                            ));
                        }
                        let missing = if sequence - expected == 1 {
                            format!("record {expected} is")
                        } else {
                            format!("records {expected}..{} are", sequence - 1)
                        };
                        return Err(finding(
                            lineno,
                            Some(sequence),
                            Problem::Deleted,
                            format!("{missing} missing before this line"),
                        ));
                    }
                    if previous != last.hash {
                        return Err(Finding {
                            file: last.file.clone(),
                            line: last.line,
                            sequence: Some(last.sequence),
                            problem: Problem::Modified,
                            detail: format!(
                                "its hash does not match the previousHash recorded by the next line ({name}:{lineno}): \
                                 this line was altered"
                            ),
                        });
                    }
                }
            }
            if object.get("eventType").and_then(Value::as_str) == Some(DIGEST_EVENT_TYPE) {
                self.check_digest(&object, sequence, previous)
                    .map_err(|(problem, detail)| finding(lineno, Some(sequence), problem, detail))?;
                self.summary.digests += 1;
                self.unsealed = None;
            } else {
                self.summary.events += 1;
                self.unsealed.get_or_insert(sequence);
            }
            let before = self.last.take().map(|l| l.hash);
            self.last = Some(Last { file: name.to_string(), line: lineno, sequence, hash, before });
            self.summary.last_sequence = Some(sequence);
        }
        if let Some(first) = self.unsealed {
            let last_line = lines.len();
            return Err(finding(
                last_line,
                self.summary.last_sequence,
                Problem::Truncated,
                format!(
                    "the file ends with records {first}..{} that no digest covers: the log was cut off after this \
                     line, or the agent did not seal it (still running, or stopped by a crash)",
                    self.summary.last_sequence.unwrap_or(first)
                ),
            ));
        }
        Ok(())
    }

    fn check_digest(
        &self,
        object: &Map<String, Value>,
        sequence: u64,
        previous: &str,
    ) -> Result<(), (Problem, String)> {
        let fields = DigestFields::from_object(object)
            .ok_or((Problem::Modified, "the digest lacks some of its members".to_string()))?;
        if fields.public_key_fingerprint != self.fingerprint {
            return Err((
                Problem::WrongKey,
                format!(
                    "the digest names key {}, not the trusted key {}",
                    fields.public_key_fingerprint, self.fingerprint
                ),
            ));
        }
        let signature = object
            .get("signature")
            .and_then(Value::as_str)
            .and_then(|s| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).ok())
            .and_then(|b| Signature::from_slice(&b).ok())
            .ok_or((Problem::BadDigest, "the digest's signature is missing or malformed".to_string()))?;
        if self.key.verify_strict(fields.signed_string().as_bytes(), &signature).is_err() {
            return Err((
                Problem::BadDigest,
                "the digest's signature does not verify under the trusted key: the digest was altered or forged".into(),
            ));
        }
        let first = self.unsealed.unwrap_or(sequence);
        if fields.sequence != sequence
            || fields.last_hash != previous
            || fields.last_sequence + 1 != sequence
            || fields.first_sequence != first
        {
            return Err((
                Problem::BadDigest,
                format!(
                    "the digest covers records {}..{} ending in hash {}, but the lines before it are records \
                     {first}..{} ending in hash {previous}",
                    fields.first_sequence,
                    fields.last_sequence,
                    fields.last_hash,
                    sequence.saturating_sub(1)
                ),
            ));
        }
        Ok(())
    }

    /// The totals, once every file has been checked.
    pub fn finish(self) -> Summary {
        self.summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Chain;
    use ed25519_dalek::SigningKey;

    /// Two files: 4 events + digest, then 3 events + digest; each line as text.
    fn log(key: &SigningKey) -> Vec<Vec<String>> {
        let mut chain = Chain::genesis();
        let mut files = vec![Vec::new(), Vec::new()];
        for (file, n) in [(0, 4), (1, 3)] {
            for i in 0..n {
                let mut event = Map::new();
                event.insert("eventName".into(), Value::from(format!("Encrypt{i}")));
                files[file].push(String::from_utf8(chain.append_event(&mut event, 1000 * i)).unwrap());
            }
            files[file].push(String::from_utf8(chain.append_digest(key, 9000).unwrap()).unwrap());
        }
        files
    }

    fn check(files: &[Vec<String>], key: &VerifyingKey) -> Result<Summary, Finding> {
        let mut v = Verifier::new(*key);
        for (i, lines) in files.iter().enumerate() {
            let mut text = lines.join("\n");
            text.push('\n');
            v.file(&format!("f{i}"), text.as_bytes())?;
        }
        Ok(v.finish())
    }

    fn expect(files: &[Vec<String>], key: &VerifyingKey, file: usize, line: usize, problem: Problem) {
        let found = check(files, key).unwrap_err();
        assert_eq!(
            (found.file.as_str(), found.line, found.problem),
            (format!("f{file}").as_str(), line, problem),
            "{found}"
        );
    }

    #[test]
    fn an_untouched_log_verifies() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let s = check(&log(&key), &key.verifying_key()).unwrap();
        assert_eq!((s.files, s.events, s.digests, s.first_sequence, s.last_sequence), (2, 7, 2, Some(0), Some(8)));
        assert!(s.from_genesis);
        // A range that starts at the second file verifies too, anchored at its first line.
        let files = log(&key);
        let s = check(&files[1..], &key.verifying_key()).unwrap();
        assert_eq!((s.events, s.from_genesis), (3, false));
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let public = key.verifying_key();
        let clean = log(&key);

        let mut edited = clean.clone();
        edited[0][1] = edited[0][1].replace("Encrypt1", "Decrypt1");
        expect(&edited, &public, 0, 2, Problem::Modified);

        // The last event before a digest: the digest's own previousHash catches it.
        let mut edited = clean.clone();
        edited[0][3] = edited[0][3].replace("Encrypt3", "Decrypt3");
        expect(&edited, &public, 0, 4, Problem::Modified);

        let mut deleted = clean.clone();
        deleted[0].remove(1);
        expect(&deleted, &public, 0, 2, Problem::Deleted);

        let mut inserted = clean.clone();
        let copy = inserted[0][0].clone();
        inserted[0].insert(2, copy);
        expect(&inserted, &public, 0, 3, Problem::Inserted);

        let mut swapped = clean.clone();
        swapped[0].swap(1, 2);
        expect(&swapped, &public, 0, 2, Problem::Reordered);

        let mut cut = clean.clone();
        cut[1].truncate(2);
        expect(&cut, &public, 1, 2, Problem::Truncated);

        let mut forged = clean.clone();
        forged[0][4] = forged[0][4]
            .replace("\"digestEnd\":\"1970-01-01T00:00:09.000Z\"", "\"digestEnd\":\"1970-01-01T00:00:08.000Z\"");
        assert_ne!(forged, clean);
        expect(&forged, &public, 0, 5, Problem::BadDigest);

        // A file repeated, or files out of order.
        let mut three = clean.clone();
        three.push(clean[1].clone());
        expect(&three, &public, 2, 1, Problem::Inserted);
        expect(&[clean[1].clone(), clean[0].clone()], &public, 1, 1, Problem::Inserted);

        // Rewritten from scratch and re-signed with another key.
        let other = SigningKey::from_bytes(&[2; 32]);
        expect(&log(&other), &public, 0, 5, Problem::WrongKey);
    }

    #[test]
    fn torn_and_empty_files_are_truncations() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut v = Verifier::new(key.verifying_key());
        assert_eq!(v.file("f", b"").unwrap_err().problem, Problem::Truncated);
        let mut v = Verifier::new(key.verifying_key());
        let torn = format!("{}\n{{\"seq", log(&key)[0][0]);
        let found = v.file("f", torn.as_bytes()).unwrap_err();
        assert_eq!((found.line, found.problem), (2, Problem::Truncated));
    }
}
