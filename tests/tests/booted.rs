//! kmsfs on a booted systemd (issue 19): a Debian 12 container booted with
//! `systemd-nspawn -b` (see `kmsfs_tests::nspawn`) with the repository's units installed as
//! the README says. In it: socket activation of kmsd, volumes mounted at boot by
//! `kmsfs@.service` and by an fstab line (`fuse.kmsfs`, through `mount.fuse3`), services
//! ordered after their mounts, identities by unit, the agent stopped under a mount, reboots
//! with nobody present, the hardened unit with an encrypted credential, and broken
//! configuration failing with one clear line.
//!
//! Where the machine cannot run nspawn at all, each test says so loudly and returns.

use kmsfs_tests::nspawn::{unit_source, Container};

/// An identity policy that lets its holder use and manage every key: the administrator's,
/// while setting the machine up (removed before the reboot, so that what comes back at boot
/// does so with the services' own policies alone).
const ADMIN_POLICY: &str =
    r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}"#;

/// What a kmsfs mount needs of its volume's key (alias/data), and nothing else.
const MOUNT_POLICY: &str = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
  "Action": ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext"], "Resource": "*",
  "Condition": {"ForAnyValue:StringEquals": {"kms:ResourceAliases": "alias/data"}}}]}"#;

/// The reader service may decrypt what was encrypted for it (app=reader).
const READER_POLICY: &str = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Decrypt",
  "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:app": "reader"}}}]}"#;

/// The fstab line of the README: `_netdev` makes it a remote-fs mount, ordered after
/// kmsd.socket (a local-fs mount could not be: the socket comes after local-fs.target), and
/// unmounted at shutdown before the agent stops.
const FSTAB_LINE: &str =
    "/srv/.web.kmsfs /srv/web fuse.kmsfs allow_other,_netdev,x-systemd.after=kmsd.socket,x-systemd.after=kmsd.service 0 0\n";

/// An application that reads its secret through the fstab mount and through the agent when
/// it starts, ordered by `RequiresMountsFor=` alone.
const READER_UNIT: &str = "[Unit]
Description=an application that reads its secrets at start
RequiresMountsFor=/srv/web

[Service]
Type=oneshot
RemainAfterExit=yes
User=reader
ExecStart=/bin/sh -c 'set -e; s=$$(cat /srv/web/reader/secret.txt); echo \"from the mount: $$s\"'
ExecStart=/bin/sh -c 'set -e; s=$$(kmsctl decrypt --encryption-context app=reader < /etc/reader/token.enc); echo \"from the agent: $$s\"'

[Install]
WantedBy=multi-user.target
";

/// The same application on the kmsfs@ mount, ordered after the service that mounts it.
const READER_DATA_UNIT: &str = "[Unit]
Description=an application that reads its secret from a kmsfs@ mount at start
RequiresMountsFor=/srv/data
Requires=kmsfs@srv-data.service
After=kmsfs@srv-data.service

[Service]
Type=oneshot
RemainAfterExit=yes
User=reader
ExecStart=/bin/sh -c 'set -e; s=$$(cat /srv/data/reader/secret.txt); echo \"from the kmsfs@ mount: $$s\"'

[Install]
WantedBy=multi-user.target
";

/// Another service, as another user with no policy: the mount's permissions and the agent's
/// policies refuse it.
const INTRUDER_UNIT: &str = "[Unit]
Description=a service that tries to read the reader's secrets
RequiresMountsFor=/srv/web

[Service]
Type=oneshot
User=intruder
ExecStart=-/bin/cat /srv/web/reader/secret.txt
ExecStart=/bin/sh -c 'kmsctl decrypt --encryption-context app=reader < /etc/reader/token.enc'

[Install]
WantedBy=multi-user.target
";

const SECRET_WEB: &str = "web-secret-3f9a";
const SECRET_DATA: &str = "data-secret-77c1";
const TOKEN: &str = "agent-token-b20e";

/// The key ID of a `kmsctl create-key` reply.
fn key_id(reply: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(reply).unwrap_or_else(|e| panic!("create-key: {e}: {reply}"));
    v["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string()
}

/// The units and configuration every test's container starts from: the agent's socket
/// enabled, the policies of the mounts and the reader, the administrator's policy, the
/// kmsfs@ configuration of /srv/data, and the two service users.
fn prepare(c: &Container) {
    c.systemctl_offline(&["enable", "kmsd.socket"]);
    c.write("/etc/kmsd/policies/users/root.json", ADMIN_POLICY);
    c.write("/etc/kmsd/policies/roles/kmsfs@srv-data.service.json", MOUNT_POLICY);
    c.write("/etc/kmsd/policies/roles/srv-web.mount.json", MOUNT_POLICY);
    c.write("/etc/kmsd/policies/roles/reader.service.json", READER_POLICY);
    c.write("/etc/kmsfs/srv-data.conf", "CIPHERDIR=/srv/.data.kmsfs\nOPTIONS=allow_other\n");
    for user in ["reader", "intruder"] {
        c.host_with_root("useradd", &["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user]);
    }
}

/// As the administrator, in the booted container: the key alias/data and two volumes under
/// it, /srv/.data.kmsfs (for kmsfs@srv-data) and /srv/.web.kmsfs (for fstab).
fn create_key_and_volumes(c: &Container) {
    let key = key_id(&c.ok("kmsctl create-key --description 'volumes'"));
    c.ok(&format!("kmsctl create-alias --alias-name alias/data --target-key-id {key}"));
    for volume in ["data", "web"] {
        c.ok(&format!(
            "mkdir -p /srv/.{volume}.kmsfs /srv/{volume} && kmsfs init /srv/.{volume}.kmsfs --key-id alias/data"
        ));
    }
}

/// Waits up to 10 s for `done`; fails the test naming `what` otherwise.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// One unit's journal lines, this boot, that contain `needle`.
fn lines_with(c: &Container, unit: &str, needle: &str) -> Vec<String> {
    c.journal(unit).lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
}

#[test]
fn socket_activation_mounts_at_boot_identities_and_reboot() {
    let Some(mut c) = Container::new() else { return };
    prepare(&c);
    c.write("/etc/systemd/system/reader.service", READER_UNIT);
    c.write("/etc/systemd/system/reader-data.service", READER_DATA_UNIT);
    c.write("/etc/systemd/system/intruder.service", INTRUDER_UNIT);
    let state = c.boot();
    assert_eq!(state, "running", "first boot: {}", c.sh("systemctl --failed --no-legend").stdout);

    // The socket is up; the agent starts on the first request and not before.
    assert_eq!(c.is_active("kmsd.socket"), "active");
    assert_eq!(c.is_active("kmsd.service"), "inactive", "kmsd started before anyone asked");
    c.ok("kmsctl list-keys");
    assert_eq!(c.is_active("kmsd.service"), "active", "kmsctl list-keys did not activate kmsd");
    let agent_log = c.journal("kmsd.service");
    assert!(agent_log.contains("using the socket passed by systemd"), "{agent_log}");
    // `systemctl reload` is SIGHUP: the policies are read again.
    let loaded = agent_log.matches("identity policies").count();
    c.ok("systemctl reload kmsd.service");
    eventually("systemctl reload reloads kmsd's policies", || {
        c.journal("kmsd.service").matches("identity policies").count() > loaded
    });

    create_key_and_volumes(&c);
    // kmsfs@ mounts /srv/data; mount(8) mounts /srv/web from fstab, through mount.fuse3 and
    // kmsfs's helper form.
    c.ok("systemctl enable --now kmsfs@srv-data.service");
    c.write("/etc/fstab", &(std::fs::read_to_string(c.path("/etc/fstab")).unwrap_or_default() + FSTAB_LINE));
    c.ok("systemctl daemon-reload && mount /srv/web");
    for (mountpoint, unit) in [("/srv/data", "srv-data.mount"), ("/srv/web", "srv-web.mount")] {
        let fstype = c.ok(&format!("findmnt --noheadings --output FSTYPE {mountpoint}"));
        assert!(fstype.trim().starts_with("fuse"), "{mountpoint} is not a FUSE mount: {fstype}");
        eventually(&format!("systemd sees {mountpoint} mounted ({unit})"), || c.is_active(unit) == "active");
    }
    // The secrets: a file in each mount only the reader may read, and a blob encrypted for
    // the reader by the agent (world-readable: it is ciphertext; the agent decides).
    for (volume, secret) in [("web", SECRET_WEB), ("data", SECRET_DATA)] {
        c.ok(&format!(
            "mkdir /srv/{volume}/reader && printf %s {secret} > /srv/{volume}/reader/secret.txt && \
             chown -R reader: /srv/{volume}/reader && chmod 0700 /srv/{volume}/reader && \
             chmod 0600 /srv/{volume}/reader/secret.txt"
        ));
    }
    c.ok(&format!(
        "mkdir -p /etc/reader && printf %s {TOKEN} | kmsctl encrypt -k alias/data --encryption-context app=reader \
         > /etc/reader/token.enc"
    ));
    c.ok("systemctl enable reader.service reader-data.service intruder.service");
    // The administrator is done and gives up the use of keys: from here on, every use is a
    // unit's own — the fstab mount's too, as role/srv-web.mount (its kmsfs runs in that
    // mount unit's cgroup).
    let loaded = c.journal("kmsd.service").matches("identity policies").count();
    c.ok("rm /etc/kmsd/policies/users/root.json");
    c.ok("systemctl reload kmsd.service");
    eventually("kmsd reloads its policies", || c.journal("kmsd.service").matches("identity policies").count() > loaded);
    let refused = c.sh("printf x | kmsctl encrypt -k alias/data >/dev/null");
    assert!(!refused.success() && refused.stderr.contains("AccessDeniedException"), "{refused:?}");
    let before = c.ok("cat /etc/reader/token.enc");

    // Reboot: nobody types anything from here on.
    let state = c.reboot();
    let failed = c.sh("systemctl --failed --plain --no-legend").stdout;
    assert_eq!(state, "degraded", "only the intruder fails at boot: {failed}");
    let failed: Vec<&str> = failed.lines().filter_map(|l| l.split_whitespace().next()).collect();
    let journals: String = failed.iter().map(|u| format!("--- {u}:\n{}", c.journal(u))).collect();
    assert_eq!(failed, ["intruder.service"], "units failed at boot besides the intruder:\n{journals}");

    assert_eq!(c.is_active("kmsd.socket"), "active");
    for unit in ["kmsfs@srv-data.service", "srv-web.mount", "kmsd.service"] {
        assert_eq!(c.is_active(unit), "active", "{unit} after the reboot:\n{}", c.journal(unit));
    }
    // The mount kmsfs@ made, as systemd sees it once it has read the mount table.
    eventually("systemd sees /srv/data mounted after the reboot", || c.is_active("srv-data.mount") == "active");
    // The kmsfs@ mount came up under its own role: the agent's audit records say so.
    let audit = c.ok("journalctl -b --no-pager -o cat --output-fields=KMSD_AUDIT_RECORD SYSLOG_IDENTIFIER=kmsd-audit \
         KMSD_AUDIT_EVENT_NAME=Decrypt");
    assert!(audit.contains("role/kmsfs@srv-data.service"), "no Decrypt by the kmsfs@ mount's role:\n{audit}");
    assert!(audit.contains("role/srv-web.mount"), "no Decrypt by the fstab mount's role:\n{audit}");
    // Each reader saw its files when it started: the units ran once, at boot, after their
    // mounts (were they not ordered, cat would have found an empty directory).
    assert_eq!(c.is_active("reader.service"), "active", "{}", c.journal("reader.service"));
    assert_eq!(c.is_active("reader-data.service"), "active", "{}", c.journal("reader-data.service"));
    let reader = c.journal("reader.service");
    assert!(reader.contains(&format!("from the mount: {SECRET_WEB}")), "{reader}");
    assert!(reader.contains(&format!("from the agent: {TOKEN}")), "{reader}");
    let reader_data = c.journal("reader-data.service");
    assert!(reader_data.contains(&format!("from the kmsfs@ mount: {SECRET_DATA}")), "{reader_data}");
    // The other service is refused by both: the mount's permissions, the agent's policy.
    let intruder = c.journal("intruder.service");
    assert!(intruder.contains("Permission denied"), "the intruder read the reader's file:\n{intruder}");
    assert!(intruder.contains("AccessDeniedException"), "the agent did not refuse the intruder:\n{intruder}");
    assert!(!intruder.contains(TOKEN) && !intruder.contains(SECRET_WEB), "{intruder}");
    let denied =
        c.ok("journalctl -b --no-pager -o cat SYSLOG_IDENTIFIER=kmsd-audit KMSD_AUDIT_OUTCOME=AccessDeniedException");
    assert!(denied.contains("intruder"), "no audit record of the intruder's refusal:\n{denied}");
    // Nothing was rewritten: the same blob, still decrypting.
    assert_eq!(c.ok("cat /etc/reader/token.enc"), before);
}

#[test]
fn stopping_the_agent_leaves_the_mount_up() {
    let Some(mut c) = Container::new() else { return };
    prepare(&c);
    assert_eq!(c.boot(), "running");
    create_key_and_volumes(&c);
    c.ok("systemctl enable --now kmsfs@srv-data.service");
    c.ok("for f in a b c; do echo content-$f > /srv/data/$f; done");
    // A fresh mount: no file key cached. Reading `a` caches its key.
    c.ok("systemctl restart kmsfs@srv-data.service");
    assert_eq!(c.ok("cat /srv/data/a").trim(), "content-a");

    // `systemctl stop kmsd`: the agent stops cleanly, the mount stays, and since the socket
    // still listens, the next request (here: opening a file whose key is not cached) starts
    // the agent again. This is how the agent is restarted under mounted volumes.
    c.ok("systemctl stop kmsd.service");
    let result = c.ok("systemctl show --property=Result --value kmsd.service");
    assert_eq!(result.trim(), "success", "kmsd did not stop cleanly:\n{}", c.journal("kmsd.service"));
    assert_eq!(c.is_active("kmsfs@srv-data.service"), "active");
    assert_eq!(c.ok("cat /srv/data/a").trim(), "content-a");
    assert_eq!(c.ok("cat /srv/data/b").trim(), "content-b", "an uncached file after kmsd stopped");
    assert_eq!(c.is_active("kmsd.service"), "active", "the socket did not start kmsd again");

    // The agent down for good (its socket too): the mount stays up, cached keys keep
    // working, other files fail with EIO until the agent is back.
    c.ok("systemctl stop kmsd.socket kmsd.service");
    assert_eq!(c.is_active("kmsd.service"), "inactive");
    assert_eq!(c.is_active("kmsfs@srv-data.service"), "active", "stopping the agent's socket took the mount down");
    assert_eq!(c.ok("cat /srv/data/a").trim(), "content-a", "a cached key stopped working");
    let uncached = c.sh("cat /srv/data/c");
    assert!(!uncached.success() && uncached.stderr.contains("Input/output error"), "{uncached:?}");
    c.ok("systemctl start kmsd.socket");
    assert_eq!(c.ok("cat /srv/data/c").trim(), "content-c", "the mount did not recover when the agent came back");
}

/// `systemd-analyze security`'s overall exposure of `unit`, from its last line
/// (`→ Overall exposure level for kmsd.service: 1.0 OK 🙂`).
fn exposure(text: &str) -> f64 {
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let score = line.split(':').nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_default();
    score.parse().unwrap_or_else(|_| panic!("no score in {line:?}"))
}

#[test]
fn hardened_agent_serves_with_an_encrypted_passphrase_credential() {
    let Some(mut c) = Container::new() else { return };
    prepare(&c);
    let dropin = std::fs::read_to_string(unit_source("kmsd.service.d/passphrase.conf")).unwrap();
    c.write("/etc/systemd/system/kmsd.service.d/passphrase.conf", &dropin);
    assert_eq!(c.boot(), "running");
    // The passphrase, encrypted by systemd-creds with the machine's credential key.
    c.ok("mkdir -p /etc/credstore.encrypted && printf 'correct horse battery staple' | \
          systemd-creds encrypt --name=kmsd-passphrase - /etc/credstore.encrypted/kmsd-passphrase");
    let key = key_id(&c.ok("kmsctl create-key"));
    let roundtrip = c.ok(&format!("printf 'hardened' | kmsctl encrypt -k {key} | kmsctl decrypt"));
    assert_eq!(roundtrip, "hardened");
    assert!(c.path("/var/lib/kmsd/root.kdf").exists(), "the root key was not derived from the passphrase");
    assert!(!c.path("/var/lib/kmsd/root.key").exists(), "a root key file next to a passphrase-derived root");
    let log = c.journal("kmsd.service");
    assert!(!log.contains("WARN"), "kmsd warned under its hardening:\n{log}");

    // What the hardening amounts to in the running process.
    let status = c.ok("cat /proc/$(systemctl show --property=MainPID --value kmsd.service)/status");
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_string();
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "no system call filter: {status}");
    let limits = c.ok("cat /proc/$(systemctl show --property=MainPID --value kmsd.service)/limits");
    assert!(
        limits.lines().any(|l| l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")),
        "{limits}"
    );
    // The unit as loaded, drop-in and all, by the container's own systemd.
    let score = exposure(&c.ok("systemd-analyze security --no-pager kmsd.service"));
    assert!(score <= 2.0, "kmsd.service exposure {score} > 2.0");
    // The credential is the service's alone.
    let listing = c.sh("ls /run/credentials/kmsd.service/");
    assert!(listing.stdout.contains("kmsd-passphrase"), "{listing:?}");
    let mode = c.ok("stat -c %a /run/credentials/kmsd.service");
    assert_eq!(mode.trim(), "500", "the credentials directory is open to others");
}

#[test]
fn broken_configuration_fails_with_one_clear_line() {
    let Some(mut c) = Container::new() else { return };
    prepare(&c);
    // A kmsfs@ instance whose CIPHERDIR names no volume, one without a configuration file,
    // and an agent whose passphrase credential is missing.
    c.write("/etc/kmsfs/srv-typo.conf", "CIPHERDIR=/srv/.dta.kmsfs\nOPTIONS=allow_other\n");
    let dropin = std::fs::read_to_string(unit_source("kmsd.service.d/passphrase.conf")).unwrap();
    c.write("/etc/systemd/system/kmsd.service.d/passphrase.conf", &dropin);
    for mountpoint in ["/srv/typo", "/srv/none"] {
        std::fs::create_dir_all(c.path(mountpoint)).expect("mount point");
    }
    c.systemctl_offline(&["enable", "kmsfs@srv-typo.service", "kmsfs@srv-none.service"]);
    let state = c.boot();
    assert_eq!(state, "degraded");

    let typo = c.journal("kmsfs@srv-typo.service");
    let fix = lines_with(&c, "kmsfs@srv-typo.service", "CIPHERDIR=/srv/.dta.kmsfs in /etc/kmsfs/srv-typo.conf");
    assert_eq!(fix.len(), 1, "one line naming the setting and the file to fix:\n{typo}");
    assert!(fix[0].contains("is not a kmsfs volume"), "{typo}");
    assert_eq!(c.is_active("kmsfs@srv-typo.service"), "failed");
    let restarts = c.ok("systemctl show --property=NRestarts --value kmsfs@srv-typo.service");
    assert_eq!(restarts.trim(), "0", "a configuration error was retried:\n{typo}");

    let none = c.journal("kmsfs@srv-none.service");
    let fix = lines_with(&c, "kmsfs@srv-none.service", "/etc/kmsfs/srv-none.conf is missing");
    assert_eq!(fix.len(), 1, "one line naming the missing file:\n{none}");
    assert_eq!(c.is_active("kmsfs@srv-none.service"), "failed");

    // The agent: a request finds the socket, kmsd starts without its credential and says
    // which one to create (once per attempt: the socket retries until systemd's start limit).
    let refused = c.sh("kmsctl list-keys");
    assert!(!refused.success(), "kmsd served without its passphrase: {refused:?}");
    let agent = c.journal("kmsd.service");
    let mut said: Vec<&str> = agent.lines().filter(|l| l.starts_with("kmsd: ")).collect();
    said.dedup();
    assert_eq!(said.len(), 1, "kmsd said one thing:\n{agent}");
    assert!(
        said[0].contains("the systemd credential kmsd-passphrase")
            && said[0].contains("systemd-creds encrypt --name=kmsd-passphrase"),
        "{agent}"
    );
    // Done as it says, the agent serves.
    c.ok("mkdir -p /etc/credstore.encrypted && printf 'correct horse battery staple' | \
          systemd-creds encrypt --name=kmsd-passphrase - /etc/credstore.encrypted/kmsd-passphrase");
    c.ok("systemctl reset-failed kmsd.socket kmsd.service && systemctl start kmsd.socket && kmsctl list-keys");

    // A state directory kmsd cannot open (its database owned by someone else, as a restore
    // from backup may leave it): kmsd.service's root has no CAP_DAC_OVERRIDE.
    c.ok("systemctl stop kmsd.service && chown 1234:1234 /var/lib/kmsd/kmsd.db");
    let refused = c.sh("kmsctl list-keys");
    assert!(!refused.success(), "kmsd served a database it cannot open: {refused:?}");
    let agent = c.journal("kmsd.service");
    let said: Vec<&str> = agent.lines().filter(|l| l.starts_with("kmsd: ") && l.contains("kmsd.db")).collect();
    assert!(!said.is_empty(), "no line names the database:\n{agent}");
    assert!(said.iter().all(|l| l.contains("owner uid 1234") && l.contains("chown -R 0:0 /var/lib/kmsd")), "{agent}");
    c.ok("chown -R 0:0 /var/lib/kmsd && systemctl reset-failed kmsd.socket kmsd.service && \
          systemctl start kmsd.socket && kmsctl list-keys");
}
