//! TLS on kmsd's TCP listener, against a real kmsd with certificates the test makes
//! (`kmsfs_tests::tls`): boto3 (`verify=`) and the aws CLI (`--ca-bundle`, `AWS_CA_BUNDLE`)
//! round-trip Encrypt/Decrypt; a client that trusts another CA, or meets an expired
//! certificate, refuses the server and nothing is served; plain HTTP to the TLS port gets
//! one clear 400; unsigned requests are refused as on plain TCP. Mutual TLS: no client
//! certificate, one from another CA or an expired one is refused at the handshake; the
//! certificate's identity is the principal `role/tls/<identity>` in key policies and
//! identity policies, is recorded in the audit trail, and binds access keys (`TlsClient`).
//! And the flags' rules: bad files refused at start naming the file, SIGHUP reloads the
//! certificate (a bad one keeps the old), non-loopback addresses need no
//! `--allow-remote-tcp` with TLS, and plain remote TCP is warned about loudly.
//!
//! boto3 and the aws CLI are test dependencies (the README's test command installs them):
//! when one is missing the test fails rather than skipping.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kmsfs_tests::tls::{CertFiles, Leaf, TestCa};
use kmsfs_tests::{TestAgent, ROOT_USES_EVERYTHING};
use serde_json::{json, Value};

const ACCOUNT: &str = "111122223333";
/// Acts as root, whose identity policy allows everything.
const ROOT_KEY: (&str, &str) = ("AKIAKMSDTLSROOT00001", "kmsd-tls-test-secret/root-0123456789");
/// Acts as `user/remote-app`, which no policy names.
const APP_KEY: (&str, &str) = ("AKIAKMSDTLSAPP000001", "kmsd-tls-test-secret/app-0123456789");
/// `user/remote-app` too, bound to the client certificate `host-b`.
const BOUND_KEY: (&str, &str) = ("AKIAKMSDTLSBOUND0001", "kmsd-tls-test-secret/bound-012345678");

fn access_keys() -> String {
    json!({"AccessKeys": [
        {"AccessKeyId": ROOT_KEY.0, "SecretAccessKey": ROOT_KEY.1, "Principal": "user/root"},
        {"AccessKeyId": APP_KEY.0, "SecretAccessKey": APP_KEY.1, "Principal": "user/remote-app"},
        {"AccessKeyId": BOUND_KEY.0, "SecretAccessKey": BOUND_KEY.1, "Principal": "user/remote-app",
         "TlsClient": "host-b"},
    ]})
    .to_string()
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn require_clients() {
    let probe = Command::new("python3")
        .args(["-c", "import boto3, shutil, sys; sys.exit(shutil.which('aws') is None)"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "boto3 or the aws CLI is missing, so kmsd's TLS listener cannot be checked against AWS's clients.\n\
             Run the README's test command, `scripts/test` (its scripts/install-test-deps installs them).\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run python3 ({e}); the TLS tests need python3 with boto3 and the aws CLI"),
    }
}

/// A test's certificates: a CA, the server's certificate for 127.0.0.1 and localhost.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
    server: CertFiles,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new(dir.path(), "ca");
        let server = ca.server("server", &["127.0.0.1", "localhost"]);
        Pki { dir, ca, server }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// `--listen-tcp` on `port` with TLS from `server` (and `client_ca` for mutual TLS).
fn tls_args(port: u16, server: &CertFiles, client_ca: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        "--listen-tcp".to_string(),
        format!("127.0.0.1:{port}"),
        "--account-id".into(),
        ACCOUNT.into(),
        "--tls-cert".into(),
        server.cert.display().to_string(),
        "--tls-key".into(),
        server.key.display().to_string(),
    ];
    if let Some(ca) = client_ca {
        args.extend(["--tls-client-ca".to_string(), ca.display().to_string()]);
    }
    args
}

fn start(args: &[String], policies: &[(&str, &str)]) -> TestAgent {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut all_policies = vec![("users/root.json", ROOT_USES_EVERYTHING)];
    all_policies.extend_from_slice(policies);
    TestAgent::start_with_access_keys(&args, &all_policies, &access_keys())
}

/// How a client reaches the agent: access key, the CA it trusts, its client certificate.
#[derive(Clone, Copy)]
struct Client<'a> {
    key: (&'a str, &'a str),
    ca: Option<&'a Path>,
    cert: Option<&'a CertFiles>,
}

impl<'a> Client<'a> {
    fn new(ca: &'a Path) -> Client<'a> {
        Client { key: ROOT_KEY, ca: Some(ca), cert: None }
    }

    fn with_key(self, key: (&'a str, &'a str)) -> Client<'a> {
        Client { key, ..self }
    }

    fn with_cert(self, cert: &'a CertFiles) -> Client<'a> {
        Client { cert: Some(cert), ..self }
    }

    /// `tests/python/tls_client.py MODE ARGS...` with this client's settings: its JSON line.
    fn python(&self, agent: &TestAgent, args: &[&str]) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tls_client.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script).args(args);
        cmd.env_remove("AWS_PROFILE").env_remove("AWS_CA_BUNDLE").env_remove("TLS_CLIENT_CERT");
        cmd.env("AWS_ACCESS_KEY_ID", self.key.0).env("AWS_SECRET_ACCESS_KEY", self.key.1);
        cmd.env("TLS_CA", self.ca.map(Path::as_os_str).unwrap_or_default());
        if let Some(cert) = self.cert {
            cmd.env("TLS_CLIENT_CERT", &cert.cert).env("TLS_CLIENT_KEY", &cert.key);
        }
        let out = cmd.output().expect("run tls_client.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "tls_client.py {args:?} printed no JSON ({e}):\n{stdout}\n{}\n--- kmsd log ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                agent.log()
            )
        })
    }

    fn kms(&self, agent: &TestAgent, endpoint: &str, operation: &str, params: Value) -> Value {
        self.python(agent, &["kms", endpoint, operation, &params.to_string()])
    }
}

fn https(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// The reply of a call that must succeed.
fn ok(result: Value, agent: &TestAgent) -> Value {
    match result.get("ok") {
        Some(reply) => reply.clone(),
        None => panic!("expected success, got {result}\n--- kmsd log ---\n{}", agent.log()),
    }
}

/// The error code of a call the service must refuse.
fn error_code(result: &Value) -> String {
    result["error"]["code"].as_str().unwrap_or_else(|| panic!("expected a service error, got {result}")).to_string()
}

/// The message of a call that must fail before any HTTP exchange (TLS refused).
fn transport_error(result: &Value) -> String {
    result["transport"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("expected the connection to fail, got {result}"))
        .to_string()
}

/// Waits until kmsd's log holds `needle` `count` times.
fn wait_for_log(agent: &TestAgent, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.log().matches(needle).count() < count {
        assert!(Instant::now() < deadline, "kmsd never logged '{needle}' ({count}x):\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Audit records of requests that came over TCP.
fn tcp_events(agent: &TestAgent) -> Vec<Value> {
    agent.audit_events().into_iter().filter(|e| e["sourceIPAddress"] != "unix").collect()
}

fn create_key(agent: &TestAgent, policy: Option<&Value>) -> String {
    let request = match policy {
        Some(policy) => json!({"Policy": policy.to_string()}),
        None => json!({}),
    };
    agent.ok("CreateKey", request)["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string()
}

/// `aws kms ...` against `port` with `--ca-bundle ca` or, with `ca_in_env`, `AWS_CA_BUNDLE`.
fn aws(port: u16, key: (&str, &str), ca: &Path, ca_in_env: bool, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("aws");
    cmd.args(["--endpoint-url", &https(port), "--region", "local", "--output", "text"]);
    cmd.env_remove("AWS_PROFILE").env_remove("AWS_CA_BUNDLE").env("AWS_MAX_ATTEMPTS", "1");
    cmd.env("AWS_ACCESS_KEY_ID", key.0).env("AWS_SECRET_ACCESS_KEY", key.1);
    if ca_in_env {
        cmd.env("AWS_CA_BUNDLE", ca);
    } else {
        cmd.arg("--ca-bundle").arg(ca);
    }
    cmd.arg("kms").args(args).output().expect("run the aws CLI")
}

fn stdout_of(out: &std::process::Output, agent: &TestAgent) -> String {
    assert!(
        out.status.success(),
        "aws CLI failed:\n{}\n--- kmsd log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Encrypt then Decrypt a file's bytes with the aws CLI.
fn aws_round_trip(agent: &TestAgent, port: u16, dir: &Path, key_id: &str, ca_in_env: bool) {
    let plaintext: Vec<u8> = (0..200u32).map(|i| (i * 7 % 251) as u8).collect();
    let input = dir.join("plaintext.bin");
    std::fs::write(&input, &plaintext).expect("write plaintext");
    let plain_arg = format!("fileb://{}", input.display());
    let out = aws(
        port,
        ROOT_KEY,
        &agent_ca(dir),
        ca_in_env,
        &["encrypt", "--key-id", key_id, "--plaintext", &plain_arg, "--query", "CiphertextBlob"],
    );
    let blob = kmsfs_tests::unb64(&Value::from(stdout_of(&out, agent)));
    let blob_path = dir.join("blob.bin");
    std::fs::write(&blob_path, &blob).expect("write blob");
    let blob_arg = format!("fileb://{}", blob_path.display());
    let out = aws(
        port,
        ROOT_KEY,
        &agent_ca(dir),
        ca_in_env,
        &["decrypt", "--ciphertext-blob", &blob_arg, "--query", "Plaintext"],
    );
    assert_eq!(kmsfs_tests::unb64(&Value::from(stdout_of(&out, agent))), plaintext, "aws kms decrypt");
}

/// Where [`Pki`] puts its CA certificate.
fn agent_ca(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

#[test]
fn boto3_and_the_aws_cli_round_trip_over_tls() {
    require_clients();
    let pki = Pki::new();
    let port = free_port();
    let agent = start(&tls_args(port, &pki.server, None), &[]);
    let key_id = create_key(&agent, None);

    let reply = ok(Client::new(&pki.ca.cert).python(&agent, &["roundtrip", &https(port), &key_id]), &agent);
    assert!(reply["KeyId"].as_str().is_some_and(|k| k.ends_with(&key_id)), "{reply}");
    aws_round_trip(&agent, port, pki.path(), &key_id, false);
    aws_round_trip(&agent, port, pki.path(), &key_id, true);

    let events = tcp_events(&agent);
    let decrypts: Vec<&Value> = events.iter().filter(|e| e["eventName"] == "Decrypt").collect();
    assert_eq!(decrypts.len(), 3, "one Decrypt record per client: {events:?}");
    for event in decrypts {
        assert_eq!(event["sourceIPAddress"], "127.0.0.1");
        assert_eq!(event["userIdentity"]["accessKeyId"], ROOT_KEY.0);
        assert!(event["userIdentity"].get("tlsClient").is_none(), "no client certificate, no tlsClient: {event}");
    }
    assert!(agent.log().contains("listening on TCP with TLS"), "{}", agent.log());
    assert!(!agent.log().contains(ROOT_KEY.1), "the secret access key appears in kmsd's log");
}

#[test]
fn a_client_that_trusts_another_ca_refuses_the_server_and_nothing_is_served() {
    require_clients();
    let pki = Pki::new();
    let other = TestCa::new(pki.path(), "other-ca");
    let port = free_port();
    let agent = start(&tls_args(port, &pki.server, None), &[]);

    let result = Client::new(&other.cert).kms(&agent, &https(port), "ListKeys", json!({}));
    let message = transport_error(&result);
    assert!(message.contains("CERTIFICATE_VERIFY_FAILED"), "{message}");
    let out = aws(port, ROOT_KEY, &other.cert, false, &["list-keys"]);
    assert!(!out.status.success(), "the aws CLI accepted a server its CA bundle does not vouch for");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CERTIFICATE_VERIFY_FAILED"), "{out:?}");

    wait_for_log(&agent, "TLS handshake failed", 2);
    assert!(agent.log().contains("peer=127.0.0.1:"), "the refused handshake names the peer:\n{}", agent.log());
    assert_eq!(tcp_events(&agent), Vec::<Value>::new(), "a refused handshake serves nothing");
}

#[test]
fn an_expired_server_certificate_is_refused_by_clients() {
    require_clients();
    let pki = Pki::new();
    let expired = pki.ca.issue(
        "expired-server",
        &Leaf { sans: vec!["127.0.0.1".into()], server: true, expired: true, ..Leaf::default() },
    );
    let port = free_port();
    let agent = start(&tls_args(port, &expired, None), &[]);
    assert!(agent.log().contains("the TLS certificate has EXPIRED"), "kmsd warns at start:\n{}", agent.log());

    let message = transport_error(&Client::new(&pki.ca.cert).kms(&agent, &https(port), "ListKeys", json!({})));
    assert!(message.contains("certificate has expired"), "{message}");
    let out = aws(port, ROOT_KEY, &pki.ca.cert, false, &["list-keys"]);
    assert!(!out.status.success(), "the aws CLI accepted an expired certificate");
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate has expired"), "{out:?}");
    wait_for_log(&agent, "TLS handshake failed", 2);
    assert_eq!(tcp_events(&agent), Vec::<Value>::new(), "nothing served with an expired certificate");
}

#[test]
fn plain_http_to_the_tls_port_gets_one_clear_400_and_nothing_more() {
    require_clients();
    let pki = Pki::new();
    let port = free_port();
    let agent = start(&tls_args(port, &pki.server, None), &[]);
    let http = format!("http://127.0.0.1:{port}");

    let raw = Client::new(&pki.ca.cert).python(&agent, &["raw", &http, "TrentService.ListKeys"]);
    assert_eq!(raw["status"], 400, "{raw}");
    assert_eq!(raw["headers"]["connection"], "close", "{raw}");
    let body: Value = serde_json::from_str(raw["body"].as_str().expect("body")).expect("a JSON 1.1 error body");
    assert_eq!(body["__type"], "ValidationException", "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("speaks TLS") && message.contains(&format!("https://127.0.0.1:{port}")), "{message}");

    // boto3 pointed at http:// shows the same message as a service error.
    let result = Client::new(&pki.ca.cert).kms(&agent, &http, "ListKeys", json!({}));
    assert_eq!(error_code(&result), "ValidationException", "{result}");
    assert!(result["error"]["message"].as_str().is_some_and(|m| m.contains("use https://")), "{result}");

    wait_for_log(&agent, "plain HTTP on the TLS port refused", 2);
    assert_eq!(tcp_events(&agent), Vec::<Value>::new(), "plain HTTP is answered, never served");
    // The port still serves TLS.
    ok(Client::new(&pki.ca.cert).kms(&agent, &https(port), "ListKeys", json!({})), &agent);
}

#[test]
fn silent_and_stalled_clients_neither_hold_up_others_nor_stay_connected() {
    use std::io::{Read, Write};
    require_clients();
    let pki = Pki::new();
    let port = free_port();
    let agent = start(&tls_args(port, &pki.server, None), &[]);
    let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // Connections that never speak, and ones that stop inside their first TLS record.
    let mut idle: Vec<std::net::TcpStream> = (0..40).map(|_| connect()).collect();
    for _ in 0..10 {
        let mut stalled = connect();
        stalled.write_all(&[0x16, 0x03, 0x01, 0x02]).expect("write");
        idle.push(stalled);
    }

    // Another client is served meanwhile, well before their handshakes time out (10 s).
    let started = Instant::now();
    ok(Client::new(&pki.ca.cert).kms(&agent, &https(port), "ListKeys", json!({})), &agent);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a client waited behind idle handshakes: {:?}",
        started.elapsed()
    );

    // Then kmsd closes them, and says so.
    for mut stream in idle {
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed by its handshake timeout: {other:?}"),
        }
    }
    wait_for_log(&agent, "TLS handshake timed out", 50);
    assert_eq!(tcp_events(&agent).len(), 1, "only the real client's request was served");
}

#[test]
fn unsigned_requests_over_tls_are_refused_as_on_plain_tcp() {
    require_clients();
    let pki = Pki::new();
    let (tls_port, plain_port) = (free_port(), free_port());
    let agent = start(&tls_args(tls_port, &pki.server, None), &[]);
    let plain = start(&["--listen-tcp".into(), format!("127.0.0.1:{plain_port}")], &[]);

    let over_tls = Client::new(&pki.ca.cert).python(&agent, &["raw", &https(tls_port), "TrentService.ListKeys"]);
    let over_tcp = Client::new(&pki.ca.cert)
        .python(&plain, &["raw", &format!("http://127.0.0.1:{plain_port}"), "TrentService.ListKeys"]);
    let body = |raw: &Value| -> Value { serde_json::from_str(raw["body"].as_str().expect("body")).expect("JSON") };
    assert_eq!(over_tls["status"], 400, "{over_tls}");
    assert_eq!(body(&over_tls)["__type"], "MissingAuthenticationTokenException", "{over_tls}");
    assert_eq!((over_tls["status"].clone(), body(&over_tls)), (over_tcp["status"].clone(), body(&over_tcp)));

    // Refused, and audited as refused, as on plain TCP.
    let events = tcp_events(&agent);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["errorCode"], "MissingAuthenticationTokenException");
}

#[test]
fn mutual_tls_refuses_clients_without_a_good_certificate() {
    require_clients();
    let pki = Pki::new();
    let host_b = pki.ca.client("host-b");
    let stranger = TestCa::new(pki.path(), "stranger-ca").client("host-x");
    let expired = pki
        .ca
        .issue("host-old", &Leaf { sans: vec!["host-old".into()], client: true, expired: true, ..Leaf::default() });
    let port = free_port();
    let agent = start(&tls_args(port, &pki.server, Some(&pki.ca.cert)), &[]);
    let endpoint = https(port);
    let client = Client::new(&pki.ca.cert);

    // Each is refused at the handshake: the client reads rustls's alert, kmsd's log says
    // why, naming the peer.
    for (what, attempt, alert, why) in [
        ("no client certificate", client, "certificate required", "peer sent no certificates"),
        (
            "a certificate from another CA",
            client.with_cert(&stranger),
            "unknown ca",
            "invalid peer certificate: UnknownIssuer",
        ),
        (
            "an expired certificate",
            client.with_cert(&expired),
            "certificate expired",
            "invalid peer certificate: certificate expired",
        ),
    ] {
        let message = transport_error(&attempt.kms(&agent, &endpoint, "ListKeys", json!({})));
        assert!(message.contains(alert), "{what}: expected the alert '{alert}', got: {message}");
        wait_for_log(&agent, &format!("TLS handshake failed: {why}"), 1);
    }
    assert_eq!(tcp_events(&agent), Vec::<Value>::new(), "refused handshakes serve nothing");

    let reply = ok(client.with_cert(&host_b).kms(&agent, &endpoint, "ListKeys", json!({})), &agent);
    assert!(reply["Keys"].is_array(), "{reply}");
    let events = tcp_events(&agent);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["userIdentity"]["tlsClient"], "host-b", "{}", events[0]);
    assert_eq!(events[0]["userIdentity"]["tlsClientArn"], format!("arn:aws:iam::{ACCOUNT}:role/tls/host-b"));

    // Without a DNS subjectAltName the identity is the CN; a wildcard names no identity (the
    // connection is served, without a role/tls/ principal).
    let by_cn = pki.ca.issue(
        "by-cn",
        &Leaf { sans: vec!["10.0.0.5".into()], common_name: Some("host-e".into()), client: true, ..Leaf::default() },
    );
    let wildcard =
        pki.ca.issue("wildcard", &Leaf { sans: vec!["*.example.com".into()], client: true, ..Leaf::default() });
    ok(client.with_cert(&by_cn).kms(&agent, &endpoint, "ListKeys", json!({})), &agent);
    ok(client.with_cert(&wildcard).kms(&agent, &endpoint, "ListKeys", json!({})), &agent);
    let events = tcp_events(&agent);
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[1]["userIdentity"]["tlsClient"], "host-e", "{}", events[1]);
    assert!(events[2]["userIdentity"].get("tlsClient").is_none(), "{}", events[2]);
    assert!(agent.log().contains("the client certificate names no usable identity"), "{}", agent.log());
}

#[test]
fn client_certificate_identities_are_principals_of_key_and_identity_policies() {
    require_clients();
    let pki = Pki::new();
    let (host_b, host_c, host_d) = (pki.ca.client("host-b"), pki.ca.client("host-c"), pki.ca.client("host-d"));
    let port = free_port();
    let host_d_policy =
        r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}]}"#;
    let agent = start(&tls_args(port, &pki.server, Some(&pki.ca.cert)), &[("roles/tls/host-d.json", host_d_policy)]);
    let key_policy = json!({"Version": "2012-10-17", "Statement": [
        {"Sid": "Account", "Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:root")},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "HostB", "Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:role/tls/host-b")},
         "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"},
    ]});
    let for_host_b = create_key(&agent, Some(&key_policy));
    let default_policy = create_key(&agent, None);
    let endpoint = https(port);
    let app = Client::new(&pki.ca.cert).with_key(APP_KEY);
    let encrypt = |client: Client, key_id: &str| {
        client.kms(&agent, &endpoint, "Encrypt", json!({"KeyId": key_id, "Plaintext": kmsfs_tests::b64(b"secret")}))
    };

    // The key policy names role/tls/host-b: host-b's certificate may, host-c's may not.
    let blob = ok(encrypt(app.with_cert(&host_b), &for_host_b), &agent)["CiphertextBlob"].clone();
    let plain = ok(app.with_cert(&host_b).kms(&agent, &endpoint, "Decrypt", json!({"CiphertextBlob": blob})), &agent);
    assert_eq!(kmsfs_tests::unb64(&plain["Plaintext"]), b"secret");
    let denied = encrypt(app.with_cert(&host_c), &for_host_b);
    assert_eq!(error_code(&denied), "AccessDeniedException", "{denied}");
    assert!(denied["error"]["message"].as_str().is_some_and(|m| m.contains("role/tls/host-c")), "{denied}");

    // roles/tls/host-d.json is host-d's identity policy, under the account's delegation.
    ok(encrypt(app.with_cert(&host_d), &default_policy), &agent);
    assert_eq!(error_code(&encrypt(app.with_cert(&host_c), &default_policy)), "AccessDeniedException");
    assert_eq!(error_code(&encrypt(app.with_cert(&host_b), &default_policy)), "AccessDeniedException");

    // A grant to role/tls/host-c lets host-c's certificate use the key.
    let grantee = format!("arn:aws:iam::{ACCOUNT}:role/tls/host-c");
    agent.ok("CreateGrant", json!({"KeyId": default_policy, "GranteePrincipal": grantee, "Operations": ["Encrypt"]}));
    ok(encrypt(app.with_cert(&host_c), &default_policy), &agent);

    let events = tcp_events(&agent);
    let by = |identity: &str, code: Option<&str>| {
        events.iter().any(|e| {
            e["eventName"] == "Encrypt"
                && e["userIdentity"]["tlsClient"] == identity
                && e["userIdentity"]["accessKeyId"] == APP_KEY.0
                && e.get("errorCode").and_then(Value::as_str) == code
        })
    };
    assert!(by("host-b", None) && by("host-c", None) && by("host-d", None), "{events:?}");
    assert!(by("host-c", Some("AccessDeniedException")), "{events:?}");
}

#[test]
fn an_access_key_bound_to_a_tls_client_is_refused_from_another_certificate() {
    require_clients();
    let pki = Pki::new();
    let (host_b, host_c) = (pki.ca.client("host-b"), pki.ca.client("host-c"));
    let port = free_port();
    let may_list = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:ListAliases", "Resource": "*"}]}"#;
    let agent = start(&tls_args(port, &pki.server, Some(&pki.ca.cert)), &[("users/remote-app.json", may_list)]);
    let endpoint = https(port);
    let bound = Client::new(&pki.ca.cert).with_key(BOUND_KEY);
    // The same user's unbound key works from either certificate: the refusal is the binding's.
    ok(
        Client::new(&pki.ca.cert).with_key(APP_KEY).with_cert(&host_c).kms(&agent, &endpoint, "ListAliases", json!({})),
        &agent,
    );

    ok(bound.with_cert(&host_b).kms(&agent, &endpoint, "ListAliases", json!({})), &agent);
    let refused = bound.with_cert(&host_c).kms(&agent, &endpoint, "ListAliases", json!({}));
    assert_eq!(error_code(&refused), "UnrecognizedClientException", "{refused}");
    let message = refused["error"]["message"].as_str().expect("message");
    assert!(message.contains(BOUND_KEY.0) && message.contains("TLS client certificate"), "{message}");
    assert!(!message.contains("host-b"), "the caller is not told which identity the key is bound to: {message}");
    assert!(agent.log().contains("bound_to=host-b"), "the operator is:\n{}", agent.log());

    let events = tcp_events(&agent);
    let refusal = events.iter().find(|e| e.get("errorCode").is_some()).expect("the refusal is audited");
    assert_eq!(refusal["errorCode"], "UnrecognizedClientException");
    assert_eq!(refusal["userIdentity"]["tlsClient"], "host-c", "{refusal}");
    assert_eq!(refusal["userIdentity"]["accessKeyId"], BOUND_KEY.0, "{refusal}");
}

#[test]
fn an_access_key_bound_to_a_tls_client_is_refused_without_mutual_tls() {
    require_clients();
    let pki = Pki::new();
    let port = free_port();
    let agent = start(&tls_args(port, &pki.server, None), &[]);
    assert!(agent.log().contains("access keys bound to a TLS client (TlsClient) are refused"), "{}", agent.log());
    let refused = Client::new(&pki.ca.cert).with_key(BOUND_KEY).kms(&agent, &https(port), "ListAliases", json!({}));
    assert_eq!(error_code(&refused), "UnrecognizedClientException", "{refused}");
}

#[test]
fn sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old() {
    use std::os::unix::fs::PermissionsExt;
    require_clients();
    let pki = Pki::new();
    let port = free_port();
    let agent = start(&tls_args(port, &pki.server, None), &[]);
    let endpoint = https(port);
    let hup = || {
        let _ = Command::new("kill").arg("-HUP").arg(agent.pid().to_string()).status();
    };
    ok(Client::new(&pki.ca.cert).kms(&agent, &endpoint, "ListKeys", json!({})), &agent);

    // A renewal by another CA, in place: after SIGHUP new connections get it.
    let renewed_ca = TestCa::new(pki.path(), "renewed-ca");
    let renewed = renewed_ca.server("renewed", &["127.0.0.1"]);
    std::fs::copy(&renewed.cert, &pki.server.cert).expect("copy certificate");
    std::fs::copy(&renewed.key, &pki.server.key).expect("copy key");
    hup();
    wait_for_log(&agent, "TLS configuration reloaded", 1);
    ok(Client::new(&renewed_ca.cert).kms(&agent, &endpoint, "ListKeys", json!({})), &agent);
    transport_error(&Client::new(&pki.ca.cert).kms(&agent, &endpoint, "ListKeys", json!({})));

    // A key file others can read is refused, and the renewed certificate keeps serving.
    std::fs::set_permissions(&pki.server.key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    hup();
    wait_for_log(&agent, "TLS configuration NOT reloaded", 1);
    assert!(agent.log().contains(&format!("{} is accessible to group or others", pki.server.key.display())));
    ok(Client::new(&renewed_ca.cert).kms(&agent, &endpoint, "ListKeys", json!({})), &agent);
}

#[test]
fn bad_tls_settings_are_refused_at_start_naming_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let agent = TestAgent::prepared(&[]);
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let refused = |args: &[&str]| agent.start_refused(args);
    let cert = pki.server.cert.to_str().expect("path");
    let key = pki.server.key.to_str().expect("path");

    let text = refused(&["--listen-tcp", &listen, "--tls-cert", cert]);
    assert!(text.contains("--tls-key"), "{text}");
    let text = refused(&["--listen-tcp", &listen, "--tls-key", key]);
    assert!(text.contains("--tls-cert"), "{text}");
    let text = refused(&["--tls-cert", cert, "--tls-key", key]);
    assert!(text.contains("there is no --listen-tcp"), "{text}");

    let missing = pki.path().join("missing.pem");
    let text = refused(&["--listen-tcp", &listen, "--tls-cert", missing.to_str().expect("path"), "--tls-key", key]);
    assert!(text.contains(&missing.display().to_string()), "{text}");

    let other = pki.ca.server("other", &["127.0.0.1"]);
    let text = refused(&["--listen-tcp", &listen, "--tls-cert", cert, "--tls-key", other.key.to_str().expect("path")]);
    assert!(text.contains("do not make a usable certificate and key"), "{text}");

    let not_a_ca = pki.path().join("not-a-ca.pem");
    std::fs::write(&not_a_ca, "hello\n").expect("write");
    let args = ["--listen-tcp", &listen, "--tls-cert", cert, "--tls-key", key, "--tls-client-ca"];
    let text = refused(&[&args[..], &[not_a_ca.to_str().expect("path")]].concat());
    assert!(text.contains(&not_a_ca.display().to_string()) && text.contains("no certificate"), "{text}");

    std::fs::set_permissions(&pki.server.key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let text = refused(&["--listen-tcp", &listen, "--tls-cert", cert, "--tls-key", key]);
    assert!(text.contains(key) && text.contains("mode 0640") && text.contains("chmod 600"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    let text = refused(&["--listen-tcp", &format!("0.0.0.0:{port}")]);
    assert!(text.contains("--allow-remote-tcp") && text.contains("no TLS") && text.contains("--tls-cert"), "{text}");
}

#[test]
fn remote_addresses_need_tls_or_a_loud_allow_remote_tcp() {
    require_clients();
    let pki = Pki::new();
    let port = free_port();
    // With TLS a non-loopback address needs nothing more.
    let mut args = tls_args(port, &pki.server, None);
    args[1] = format!("0.0.0.0:{port}");
    let agent = start(&args, &[]);
    ok(Client::new(&pki.ca.cert).kms(&agent, &https(port), "ListKeys", json!({})), &agent);
    assert!(!agent.log().contains("IN CLEAR"), "{}", agent.log());
    drop(agent);

    // Without TLS it takes --allow-remote-tcp, and a warning at start.
    let port = free_port();
    let plain = start(&["--listen-tcp".into(), format!("0.0.0.0:{port}"), "--allow-remote-tcp".into()], &[]);
    assert!(plain.log().contains("WARN") && plain.log().contains("--allow-remote-tcp WITHOUT TLS"), "{}", plain.log());
    assert!(plain.log().contains("IN CLEAR"), "{}", plain.log());
}
