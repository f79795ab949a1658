//! `kmsctl audit`: the audit trail's public key, offline verification of its files, and
//! queries over them. Verification and queries read the files directly, with the verifier of
//! `kmsfs_common::audit`; the agent is asked only where its files are and what its key is
//! (`Kmsfs.GetAuditInfo`), and not at all when `--dir` and `--public-key` are given — so a
//! copy of the log can be checked on another machine.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use kmsfs_common::audit::{self, verify::Verifier};
use kmsfs_common::client::AgentClient;
use serde_json::{json, Value};

use crate::cli::{AuditCommand, AuditQuery, AuditVerify, Outcome, QueryFormat};
use crate::Failure;

const MS_PER_DAY: i64 = 86_400_000;

pub fn run(command: &AuditCommand, socket: Option<&Path>) -> Result<(), Failure> {
    match command {
        AuditCommand::PublicKey => {
            let (_, key) = agent_info(socket, false)?;
            print(&format!("{}\n", audit::encode_public_key(&key)))
        }
        AuditCommand::Verify(args) => verify(args, socket),
        AuditCommand::Query(args) => query(args, socket),
    }
}

/// The agent's audit directory and public key; `seal` has it seal the live file first.
fn agent_info(socket: Option<&Path>, seal: bool) -> Result<(PathBuf, VerifyingKey), Failure> {
    const ACTION: &str = "Kmsfs.GetAuditInfo";
    let mut client = AgentClient::connect_or_start(socket).map_err(|e| Failure::Other(e.to_string()))?;
    let info = client.call(ACTION, &json!({"Seal": seal})).map_err(|e| Failure::from_client(ACTION, e))?;
    if info["Enabled"] != true {
        return Err(Failure::Other("the agent's audit trail is off (kmsd --audit off)".into()));
    }
    let dir = info["Directory"].as_str().ok_or_else(|| Failure::Other("the agent named no audit directory".into()))?;
    let key = info["PublicKey"].as_str().ok_or_else(|| Failure::Other("the agent named no public key".into()))?;
    let key = audit::parse_public_key(key).map_err(Failure::Other)?;
    Ok((PathBuf::from(dir), key))
}

fn verify(args: &AuditVerify, socket: Option<&Path>) -> Result<(), Failure> {
    let given_key = match &args.source.public_key {
        Some(text) => Some(audit::parse_public_key(text).map_err(|e| Failure::Usage(format!("--public-key: {e}")))?),
        None => None,
    };
    let (dir, key) = match (&args.source.dir, given_key) {
        (Some(dir), Some(key)) => (dir.clone(), key),
        // The live log: the agent seals it first, so that it verifies up to this moment.
        (None, key) => {
            let (dir, agents) = agent_info(socket, true)?;
            (dir, key.unwrap_or(agents))
        }
        (Some(dir), None) => (dir.clone(), agent_info(socket, false)?.1),
    };
    let from = day_arg("--from", args.from.as_deref())?;
    let to = day_arg("--to", args.to.as_deref())?;
    let files = files_in(&dir, from, to)?;
    if files.is_empty() {
        return Err(Failure::Other(format!("no audit files (YYYY-MM-DD.jsonl) in {} for that range", dir.display())));
    }
    let mut verifier = Verifier::new(key);
    for (name, path) in &files {
        let bytes = fs::read(path).map_err(|e| Failure::Other(format!("cannot read {}: {e}", path.display())))?;
        verifier.file(name, &bytes).map_err(|finding| Failure::Tampered(finding.to_string()))?;
    }
    let s = verifier.finish();
    let span = match (s.first_sequence, s.last_sequence) {
        (Some(first), Some(last)) => format!("lines {first}..{last}"),
        _ => "no lines".into(),
    };
    let anchor = if s.from_genesis {
        "from the log's first line".to_string()
    } else {
        format!("anchored at line {} (earlier files were not checked)", s.first_sequence.unwrap_or(0))
    };
    print(&format!(
        "verified: {} file(s) ({} .. {}), {} records and {} digests, {span}, {anchor}; signed by key {}\n",
        s.files,
        files.first().map_or("", |f| f.0.as_str()),
        files.last().map_or("", |f| f.0.as_str()),
        s.events,
        s.digests,
        audit::key_fingerprint(&key)
    ))
}

/// A `--from`/`--to` day.
fn day_arg(flag: &str, value: Option<&str>) -> Result<Option<i64>, Failure> {
    value
        .map(|v| audit::parse_date(v).ok_or_else(|| Failure::Usage(format!("{flag} {v:?} is not a date (YYYY-MM-DD)"))))
        .transpose()
}

/// The audit files of days `from..=to` in `dir`, in order.
fn files_in(dir: &Path, from: Option<i64>, to: Option<i64>) -> Result<Vec<(String, PathBuf)>, Failure> {
    let entries = fs::read_dir(dir)
        .map_err(|e| Failure::Other(format!("cannot read the audit directory {}: {e}", dir.display())))?;
    let mut files: Vec<(i64, String, PathBuf)> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let day = audit::parse_file_name(&name)?;
            Some((day, name, entry.path()))
        })
        .filter(|(day, _, _)| from.is_none_or(|f| *day >= f) && to.is_none_or(|t| *day <= t))
        .collect();
    files.sort();
    Ok(files.into_iter().map(|(_, name, path)| (name, path)).collect())
}

/// Query filters, parsed.
struct Filter<'a> {
    from: Option<i64>,
    /// Exclusive.
    until: Option<i64>,
    key: Option<&'a str>,
    principal: Option<&'a str>,
    action: Option<&'a str>,
    outcome: Option<Outcome>,
}

impl Filter<'_> {
    fn matches(&self, record: &Value) -> bool {
        let text = |v: &Value| v.as_str().map(str::to_string);
        let time = record["eventTime"].as_str().and_then(audit::parse_time);
        if self.from.is_some_and(|from| time.is_none_or(|t| t < from))
            || self.until.is_some_and(|until| time.is_none_or(|t| t >= until))
        {
            return false;
        }
        if let Some(action) = self.action {
            if !record["eventName"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(action)) {
                return false;
            }
        }
        if let Some(outcome) = self.outcome {
            let error = record["errorCode"].as_str();
            let wanted = match outcome {
                Outcome::Success => error.is_none(),
                Outcome::Failure => error.is_some(),
                Outcome::Denied => error == Some("AccessDeniedException"),
            };
            if !wanted {
                return false;
            }
        }
        if let Some(principal) = self.principal {
            let who = &record["userIdentity"];
            let names = ["arn", "userName", "roleArn", "accessKeyId"].map(|m| text(&who[m]));
            if !names.iter().flatten().any(|n| n == principal) {
                return false;
            }
        }
        if let Some(key) = self.key {
            let arns = record["resources"].as_array().into_iter().flatten().filter_map(|r| r["ARN"].as_str());
            let named = arns.clone().any(|arn| arn == key || arn.rsplit_once("key/").is_some_and(|(_, id)| id == key))
                || record["requestParameters"]["keyId"].as_str() == Some(key);
            if !named {
                return false;
            }
        }
        true
    }
}

fn query(args: &AuditQuery, socket: Option<&Path>) -> Result<(), Failure> {
    let time = |flag: &str, value: &Option<String>| -> Result<Option<i64>, Failure> {
        value
            .as_deref()
            .map(|v| {
                audit::parse_time(v).ok_or_else(|| {
                    Failure::Usage(format!("{flag} {v:?} is not a time (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS[.mmm]Z)"))
                })
            })
            .transpose()
    };
    let from = time("--from", &args.from)?;
    // A bare date as --to includes that whole day.
    let until = time("--to", &args.to)?.map(|t| match &args.to {
        Some(v) if v.len() == 10 => t + MS_PER_DAY,
        _ => t + 1,
    });
    let filter = Filter {
        from,
        until,
        key: args.key_id.as_deref(),
        principal: args.principal.as_deref(),
        action: args.action.as_deref(),
        outcome: args.outcome,
    };
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => agent_info(socket, false)?.0,
    };
    // A record lands in the file of the day it was written, at most moments after its
    // eventTime: look one day further.
    let files = files_in(&dir, from.map(|t| t.div_euclid(MS_PER_DAY)), until.map(|t| t.div_euclid(MS_PER_DAY) + 1))?;
    let mut out = io::stdout().lock();
    let mut rows = Vec::new();
    for (_, path) in files {
        let text =
            fs::read_to_string(&path).map_err(|e| Failure::Other(format!("cannot read {}: {e}", path.display())))?;
        for line in text.lines() {
            let Ok(record) = serde_json::from_str::<Value>(line) else { continue };
            if record["eventType"] == audit::DIGEST_EVENT_TYPE || !filter.matches(&record) {
                continue;
            }
            match args.format {
                QueryFormat::Jsonl => writeln!(out, "{line}").map_err(stdout_error)?,
                QueryFormat::Table => rows.push(row(&record)),
            }
        }
    }
    if args.format == QueryFormat::Table {
        let header = ["TIME", "ACTION", "OUTCOME", "PRINCIPAL", "KEY"].map(str::to_string);
        let mut widths = header.clone().map(|h| h.len());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            writeln!(out, "{}", cells.join("  ").trim_end()).map_err(stdout_error)?;
        }
    }
    out.flush().map_err(stdout_error)
}

/// A record as a table row: time, action, outcome, principal, key ID.
fn row(record: &Value) -> [String; 5] {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let who = &record["userIdentity"];
    let principal = who["arn"].as_str().or(who["accessKeyId"].as_str()).unwrap_or("-").to_string();
    let key = record["resources"][0]["ARN"].as_str().map(|arn| arn.rsplit('/').next().unwrap_or(arn).to_string());
    let outcome = record["errorCode"].as_str().unwrap_or("OK").to_string();
    [s(&record["eventTime"]), s(&record["eventName"]), outcome, principal, key.unwrap_or_else(|| "-".into())]
}

fn print(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(stdout_error)
}

fn stdout_error(e: io::Error) -> Failure {
    Failure::Other(format!("cannot write to stdout: {e}"))
}
