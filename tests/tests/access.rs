//! Access control end to end: real Unix users and groups (created by the test), clients
//! run as them with `setpriv`, a client inside a real systemd-service cgroup, and the
//! agent deciding with key policies, identity policies (reloaded on SIGHUP) and grants.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use kmsfs_common::ErrorKind;
use kmsfs_tests::{b64, bin, is_root, TestAgent};
use serde_json::{json, Value};

/// A Unix user (and optionally group membership) that exists for the test's duration.
struct TestUser {
    name: String,
}

fn run_ok(cmd: &mut Command) {
    // useradd/groupadd lock /etc/passwd and /etc/group: tests running in parallel retry.
    for _ in 0..50 {
        if cmd.status().map(|s| s.success()).unwrap_or(false) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{cmd:?} kept failing");
}

impl TestUser {
    fn create(tag: &str, groups: &[&str]) -> TestUser {
        assert!(is_root(), "access tests create Unix users and need root (CI runs as root)");
        let name = format!("kt{}{tag}", std::process::id() % 100_000);
        let mut cmd = Command::new("useradd");
        cmd.args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]);
        if !groups.is_empty() {
            cmd.arg("--groups").arg(groups.join(","));
        }
        run_ok(cmd.arg(&name));
        TestUser { name }
    }

    fn arn(&self, agent: &TestAgent) -> String {
        format!("arn:aws:iam::{}:user/{}", account(agent), self.name)
    }

    /// Runs kmsctl as this user (with its groups) against `agent`.
    fn kmsctl(&self, agent: &TestAgent, args: &[&str]) -> Output {
        Command::new("setpriv")
            .arg(format!("--reuid={}", self.name))
            .arg(format!("--regid={}", self.name))
            .arg("--init-groups")
            .arg("--")
            .arg(bin("kmsctl"))
            .arg("--socket")
            .arg(agent.socket())
            .args(args)
            .output()
            .expect("setpriv runs")
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let quiet = |cmd: &mut Command| {
            let _ = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status();
        };
        quiet(Command::new("userdel").arg(&self.name));
        quiet(Command::new("groupdel").arg(&self.name));
    }
}

struct TestGroup {
    name: String,
}

impl TestGroup {
    fn create(tag: &str) -> TestGroup {
        let name = format!("kg{}{tag}", std::process::id() % 100_000);
        run_ok(Command::new("groupadd").arg("--system").arg(&name));
        TestGroup { name }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

fn account(agent: &TestAgent) -> String {
    agent.ok("DescribeKey", json!({"KeyId": agent.ok("ListKeys", json!({}))["Keys"][0]["KeyId"]}))["KeyMetadata"]
        ["AWSAccountId"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An agent whose socket other users can reach, with root allowed everything.
fn agent_for_users() -> TestAgent {
    let agent = TestAgent::start();
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    agent
}

fn create_key(agent: &TestAgent) -> String {
    kmsfs_tests::create_key(agent)
}

fn succeeded(out: &Output) -> bool {
    out.status.success()
}

fn denied(out: &Output) -> bool {
    out.status.code() == Some(254) && String::from_utf8_lossy(&out.stderr).contains("AccessDeniedException")
}

fn encrypt_as(user: &TestUser, agent: &TestAgent, key: &str, context: Option<&str>) -> Output {
    let mut args = vec!["encrypt", "--key-id", key, "--plaintext", "aGVsbG8="];
    if let Some(c) = context {
        args.extend(["--encryption-context", c]);
    }
    user.kmsctl(agent, &args)
}

fn policy(statements: Value) -> String {
    json!({"Version": "2012-10-17", "Statement": statements}).to_string()
}

#[test]
fn without_policies_users_are_denied_and_root_only_administers() {
    assert!(is_root(), "needs root");
    let agent = TestAgent::start_configured(&[], &[]);
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Root administers keys by default ...
    let key = create_key(&agent);
    agent.ok("DescribeKey", json!({"KeyId": key}));
    agent.ok("DisableKey", json!({"KeyId": key}));
    agent.ok("EnableKey", json!({"KeyId": key}));
    // ... but may not use them until a policy says so.
    let e = agent.call("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x")})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AccessDeniedException, "{e}");
    assert!(e.message.contains("user/root") && e.message.contains("kms:Encrypt"), "{e}");
    let e = agent.call("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AccessDeniedException);
    // Anyone else may do nothing.
    let user = TestUser::create("a", &[]);
    assert!(denied(&user.kmsctl(&agent, &["list-keys"])));
    assert!(denied(&user.kmsctl(&agent, &["describe-key", "--key-id", &key])));
    assert!(denied(&encrypt_as(&user, &agent, &key, None)));
    // Members of kmsadmin administer keys too (the group is created if the host lacks it).
    let _ = Command::new("groupadd").args(["--system", "kmsadmin"]).stderr(std::process::Stdio::null()).status();
    let admin = TestUser::create("adm", &["kmsadmin"]);
    assert!(succeeded(&admin.kmsctl(&agent, &["describe-key", "--key-id", &key])));
    assert!(succeeded(&admin.kmsctl(&agent, &["create-key", "--description", "by an admin"])));
    assert!(denied(&encrypt_as(&admin, &agent, &key, None)));
}

#[test]
fn identity_policies_for_users_groups_and_reload() {
    let agent = agent_for_users();
    let key = create_key(&agent);
    let group = TestGroup::create("g");
    let alice = TestUser::create("al", &[&group.name]);
    let bob = TestUser::create("bo", &[]);
    // alice may Encrypt (user policy), not Decrypt.
    let encrypt_only = policy(json!([{"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}]));
    agent.set_policy(&format!("users/{}.json", alice.name), Some(&encrypt_only));
    let out = encrypt_as(&alice, &agent, &key, None);
    assert!(succeeded(&out), "{}", String::from_utf8_lossy(&out.stderr));
    let blob: Value = serde_json::from_slice(&out.stdout).unwrap();
    let blob = blob["CiphertextBlob"].as_str().unwrap();
    assert!(denied(&alice.kmsctl(&agent, &["decrypt", "--ciphertext-blob", blob])));
    assert!(denied(&encrypt_as(&bob, &agent, &key, None)));
    // The group's policy adds Decrypt for its members only.
    let decrypt = policy(json!([{"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*"}]));
    agent.set_policy(&format!("groups/{}.json", group.name), Some(&decrypt));
    assert!(succeeded(&alice.kmsctl(&agent, &["decrypt", "--ciphertext-blob", blob])));
    assert!(denied(&bob.kmsctl(&agent, &["decrypt", "--ciphertext-blob", blob])));
    // A bad file is reported and the previous policies stay in force.
    agent.set_policy("users/broken.json", Some(r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Maybe"}]}"#));
    assert!(agent.log().contains("NOT reloaded"), "{}", agent.log());
    assert!(succeeded(&alice.kmsctl(&agent, &["decrypt", "--ciphertext-blob", blob])));
    agent.set_policy("users/broken.json", None);
    // An explicit Deny anywhere wins over any Allow.
    let deny = policy(json!([{"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"}]));
    agent.set_policy(&format!("users/{}.json", alice.name), Some(&deny));
    let out = alice.kmsctl(&agent, &["decrypt", "--ciphertext-blob", blob]);
    assert!(denied(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("explicitly denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn key_policies_decide_and_guard_against_lockout() {
    let agent = agent_for_users();
    let alice = TestUser::create("kp", &[]);
    let acct = {
        let k = create_key(&agent);
        agent.ok("DescribeKey", json!({"KeyId": k}))["KeyMetadata"]["AWSAccountId"].as_str().unwrap().to_string()
    };
    let root = format!("arn:aws:iam::{acct}:user/root");
    // Root administers, alice uses; no delegation to the account.
    let own_policy = policy(json!([
        {"Sid": "Admins", "Effect": "Allow", "Principal": {"AWS": root}, "Resource": "*",
         "Action": ["kms:Describe*", "kms:Put*", "kms:Get*", "kms:List*", "kms:Create*", "kms:Revoke*"]},
        {"Sid": "Users", "Effect": "Allow", "Principal": {"AWS": alice.arn(&agent)}, "Resource": "*",
         "Action": ["kms:Encrypt", "kms:Decrypt"]}
    ]));
    let key =
        agent.ok("CreateKey", json!({"Policy": own_policy}))["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let got = agent.ok("GetKeyPolicy", json!({"KeyId": key, "PolicyName": "default"}));
    assert_eq!(got["Policy"], own_policy.as_str());
    assert_eq!(agent.ok("ListKeyPolicies", json!({"KeyId": key}))["PolicyNames"], json!(["default"]));
    assert!(succeeded(&encrypt_as(&alice, &agent, &key, None)));
    // Root's identity policy allows kms:*, but this key policy does not delegate.
    let e = agent.call("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x")})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AccessDeniedException, "{e}");
    // The default key policy delegates, as AWS's does.
    let default_key = create_key(&agent);
    let default_policy =
        agent.ok("GetKeyPolicy", json!({"KeyId": default_key}))["Policy"].as_str().unwrap().to_string();
    assert!(default_policy.contains(&format!("arn:aws:iam::{acct}:root")) && default_policy.contains("key-default-1"));
    assert!(denied(&encrypt_as(&alice, &agent, &default_key, None)));

    // Lockout: a policy that would stop root from changing it again is refused ...
    let lockout = policy(
        json!([{"Effect": "Allow", "Principal": {"AWS": alice.arn(&agent)}, "Action": "kms:*", "Resource": "*"}]),
    );
    let e = agent.call("PutKeyPolicy", json!({"KeyId": key, "Policy": lockout})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::MalformedPolicyDocumentException, "{e}");
    assert_eq!(agent.ok("GetKeyPolicy", json!({"KeyId": key}))["Policy"], own_policy.as_str(), "unchanged");
    // ... unless the caller says it knows.
    agent.ok("PutKeyPolicy", json!({"KeyId": key, "Policy": lockout, "BypassPolicyLockoutSafetyCheck": true}));
    let e = agent.call("GetKeyPolicy", json!({"KeyId": key})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AccessDeniedException, "root locked itself out: {e}");

    // Malformed documents say what is wrong and where.
    for (doc, needle) in [
        (
            r#"{"Version": "2012-10-17", "Statement": [{"Sid": "S1", "Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}, {"Sid": "S2", "Effect": "Perhaps", "Principal": "*", "Action": "kms:*", "Resource": "*"}]}"#,
            "S2",
        ),
        ("not json", "JSON"),
        (
            r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}"#,
            "Principal",
        ),
    ] {
        let e = agent.call("CreateKey", json!({"Policy": doc})).unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedPolicyDocumentException, "{doc}: {e}");
        assert!(e.message.contains(needle), "{doc}: {e}");
    }
}

#[test]
fn grants_with_constraints_take_effect_and_end_at_once() {
    let agent = agent_for_users();
    let key = create_key(&agent);
    let alice = TestUser::create("gr", &[]);
    let bob = TestUser::create("gb", &[]);
    assert!(denied(&encrypt_as(&alice, &agent, &key, Some("app=x"))));
    let grant = agent.ok(
        "CreateGrant",
        json!({"KeyId": key, "GranteePrincipal": alice.arn(&agent), "RetiringPrincipal": bob.arn(&agent),
               "Operations": ["Encrypt", "Decrypt"], "Name": "app-x",
               "Constraints": {"EncryptionContextSubset": {"app": "x"}}}),
    );
    let (token, grant_id) = (grant["GrantToken"].as_str().unwrap(), grant["GrantId"].as_str().unwrap());
    // Idempotent by name.
    let again = agent.ok(
        "CreateGrant",
        json!({"KeyId": key, "GranteePrincipal": alice.arn(&agent), "RetiringPrincipal": bob.arn(&agent),
               "Operations": ["Decrypt", "Encrypt"], "Name": "app-x",
               "Constraints": {"EncryptionContextSubset": {"app": "x"}}}),
    );
    assert_eq!(again["GrantId"], grant_id);
    let listed = agent.ok("ListGrants", json!({"KeyId": key}));
    assert_eq!(listed["Grants"].as_array().unwrap().len(), 1);
    assert_eq!(listed["Grants"][0]["Constraints"], json!({"EncryptionContextSubset": {"app": "x"}}));
    assert_eq!(
        agent.ok("ListRetirableGrants", json!({"RetiringPrincipal": bob.arn(&agent)}))["Grants"][0]["GrantId"],
        grant_id
    );
    // The grant works at once, within its constraint only.
    assert!(succeeded(&encrypt_as(&alice, &agent, &key, Some("app=x"))));
    assert!(
        succeeded(&encrypt_as(&alice, &agent, &key, Some("app=x,extra=1"))),
        "a subset constraint allows more pairs"
    );
    assert!(denied(&encrypt_as(&alice, &agent, &key, Some("app=y"))));
    assert!(denied(&encrypt_as(&alice, &agent, &key, None)));
    assert!(denied(&encrypt_as(&bob, &agent, &key, Some("app=x"))), "bob may only retire it");
    // The retiring principal retires it; it stops working at once.
    let out = bob.kmsctl(&agent, &["retire-grant", "--grant-token", token]);
    assert!(succeeded(&out), "bob retires the grant: {}", String::from_utf8_lossy(&out.stderr));
    assert!(denied(&encrypt_as(&alice, &agent, &key, Some("app=x"))));
    assert_eq!(agent.ok("ListGrants", json!({"KeyId": key}))["Grants"], json!([]));
    // A revoked grant also stops at once.
    let grant = agent
        .ok("CreateGrant", json!({"KeyId": key, "GranteePrincipal": alice.arn(&agent), "Operations": ["Encrypt"]}));
    assert!(succeeded(&encrypt_as(&alice, &agent, &key, None)));
    agent.ok("RevokeGrant", json!({"KeyId": key, "GrantId": grant["GrantId"]}));
    assert!(denied(&encrypt_as(&alice, &agent, &key, None)));
    let e = agent.call("RevokeGrant", json!({"KeyId": key, "GrantId": grant["GrantId"]})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFoundException);
    let e = agent.call("RetireGrant", json!({"GrantToken": "nope"})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidGrantTokenException);
    let e = agent
        .call("CreateGrant", json!({"KeyId": key, "GranteePrincipal": alice.arn(&agent), "Operations": ["Sign"]}))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::ValidationException);
}

#[test]
fn a_systemd_service_is_allowed_by_its_role_policy() {
    assert!(is_root(), "needs root");
    let agent = agent_for_users();
    let key = create_key(&agent);
    let hierarchy = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup", "/sys/fs/cgroup/systemd"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|h| h.join("cgroup.procs").exists())
        .expect("a cgroup hierarchy");
    let unit = format!("kmsfs-role-{}.service", std::process::id());
    let cgroup = hierarchy.join("system.slice").join(&unit);
    std::fs::create_dir_all(&cgroup).unwrap();
    let allow = policy(json!([{"Effect": "Allow", "Action": ["kms:Encrypt"], "Resource": "*",
                                "Condition": {"StringEquals": {"kmsd:Unit": unit}}}]));
    agent.set_policy(&format!("roles/{unit}.json"), Some(&allow));
    let run = |inside: bool| {
        let enter =
            if inside { format!("echo $$ > {} && ", cgroup.join("cgroup.procs").display()) } else { String::new() };
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{enter}exec setpriv --reuid=65534 --regid=65534 --clear-groups -- {} --socket {} encrypt --key-id {key} --plaintext aGk=",
                bin("kmsctl").display(),
                agent.socket().display()
            ))
            .output()
            .unwrap()
    };
    let inside = run(true);
    let outside = run(false);
    let _ = std::fs::remove_dir(&cgroup);
    assert!(succeeded(&inside), "inside the unit: {}", String::from_utf8_lossy(&inside.stderr));
    assert!(denied(&outside), "outside the unit: {}", String::from_utf8_lossy(&outside.stderr));
}
