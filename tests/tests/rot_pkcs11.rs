//! The pkcs11 root of trust end to end: a kmsd initialized on a SoftHSM2 token makes every
//! key's material in the token (sensitive, never extractable, as the token itself reports),
//! keeps only references to it in its state directory, encrypts and decrypts there across
//! restarts, and refuses to initialize or start, with a clear message, on a wrong PIN, a
//! missing module or a missing token.
//!
//! kmsd finds SoftHSM2's configuration in `SOFTHSM2_CONF`, set for it alone
//! ([`TestAgent::set_env`]); this process sets it for itself only to look into a token, one
//! look at a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kmsfs_tests::softhsm::SoftHsm;
use kmsfs_tests::{b64, create_key, unb64, TestAgent};
use serde_json::{json, Value};

const LABEL: &str = "kmsd-root";
/// Distinctive, so that a scan of the state directory for it means something.
const PIN: &str = "pin-7f3a9c51";

/// A SoftHSM2 with the token [`LABEL`], and an agent directory (nothing running) pointed
/// at it. Fields drop in order: the agent before the HSM.
struct Setup {
    agent: TestAgent,
    hsm: SoftHsm,
    pin_file: PathBuf,
}

fn prepare() -> Setup {
    let hsm = SoftHsm::new();
    hsm.init_token(LABEL, PIN);
    let pin_file = hsm.pin_file("pin", PIN);
    let mut agent = TestAgent::prepared(&["--pkcs11-pin-file", pin_file.to_str().expect("utf-8 path")]);
    let (var, conf) = hsm.env();
    agent.set_env(var, conf.to_str().expect("utf-8 path"));
    Setup { agent, hsm, pin_file }
}

/// `kmsd init --root-of-trust pkcs11` with these settings.
fn init(agent: &TestAgent, module: &Path, label: &str, pin_file: &Path) -> Output {
    agent
        .kmsd()
        .args(["init", "--root-of-trust", "pkcs11", "--pkcs11-module"])
        .arg(module)
        .args(["--pkcs11-token-label", label, "--pkcs11-pin-file"])
        .arg(pin_file)
        .output()
        .expect("run kmsd init")
}

/// A running agent whose root of trust is the token [`LABEL`].
fn setup() -> Setup {
    let mut s = prepare();
    let out = init(&s.agent, &s.hsm.module(), LABEL, &s.pin_file);
    assert!(out.status.success(), "kmsd init failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains(&format!("pkcs11 (token '{LABEL}', {})", s.hsm.module().display())), "{summary}");
    s.agent.start_again();
    s
}

fn encrypt(agent: &TestAgent, key: &str, plaintext: &[u8], context: &Value) -> Value {
    agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(plaintext), "EncryptionContext": context}))
}

fn decrypt(agent: &TestAgent, blob: &Value, context: &Value) -> Value {
    agent.ok("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": context}))
}

/// A look into a token from this process with cryptoki, as its owner would check it.
mod token {
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::{Mutex, OnceLock};

    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    use kmsfs_tests::softhsm::{SoftHsm, MODULE};

    /// A secret-key object and what the token says of its protection.
    #[derive(Debug, Default)]
    pub struct SecretKey {
        pub label: String,
        pub id: Vec<u8>,
        pub token: bool,
        pub private: bool,
        pub sensitive: bool,
        pub extractable: bool,
        pub always_sensitive: bool,
        pub never_extractable: bool,
        /// Whether C_GetAttributeValue gave CKA_VALUE.
        pub value_readable: bool,
    }

    /// Every secret-key object in the token `label`, logged in with `pin`. The module is
    /// initialized for the look, with this HSM's configuration (SoftHSM2 reads it, and the
    /// token directory, then), and finalized after; tests sharing the process take turns.
    pub fn secret_keys(hsm: &SoftHsm, label: &str, pin: &str) -> Vec<SecretKey> {
        static LOADED: OnceLock<Pkcs11> = OnceLock::new();
        static TURN: Mutex<()> = Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let pkcs11 = LOADED.get_or_init(|| Pkcs11::new(MODULE).expect("load SoftHSM2"));
        let (var, conf) = hsm.env();
        std::env::set_var(var, conf);
        pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
        let look = catch_unwind(AssertUnwindSafe(|| look(pkcs11, label, pin)));
        let _ = pkcs11.clone().finalize();
        look.unwrap_or_else(|panic| resume_unwind(panic))
    }

    fn look(pkcs11: &Pkcs11, label: &str, pin: &str) -> Vec<SecretKey> {
        let slot = pkcs11
            .get_slots_with_token()
            .expect("C_GetSlotList")
            .into_iter()
            .find(|slot| pkcs11.get_token_info(*slot).is_ok_and(|info| info.label() == label))
            .unwrap_or_else(|| panic!("no token labelled {label}"));
        let session = pkcs11.open_ro_session(slot).expect("C_OpenSession");
        session.login(UserType::User, Some(&AuthPin::from(pin))).expect("C_Login");
        let handles = session.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)]).expect("C_FindObjects");
        handles
            .into_iter()
            .map(|handle| {
                let attributes = session
                    .get_attributes(
                        handle,
                        &[
                            AttributeType::Label,
                            AttributeType::Id,
                            AttributeType::Token,
                            AttributeType::Private,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::AlwaysSensitive,
                            AttributeType::NeverExtractable,
                            AttributeType::Value,
                        ],
                    )
                    .expect("C_GetAttributeValue");
                let mut key = SecretKey::default();
                for attribute in attributes {
                    match attribute {
                        Attribute::Label(l) => key.label = String::from_utf8_lossy(&l).into_owned(),
                        Attribute::Id(id) => key.id = id,
                        Attribute::Token(b) => key.token = b,
                        Attribute::Private(b) => key.private = b,
                        Attribute::Sensitive(b) => key.sensitive = b,
                        Attribute::Extractable(b) => key.extractable = b,
                        Attribute::AlwaysSensitive(b) => key.always_sensitive = b,
                        Attribute::NeverExtractable(b) => key.never_extractable = b,
                        Attribute::Value(_) => key.value_readable = true,
                        _ => {}
                    }
                }
                key
            })
            .collect()
    }
}

/// The token's object for version `version` of `key`, checked to be protected as kmsd
/// promises: on the token, private, sensitive and never extractable since its generation.
fn object_of<'a>(objects: &'a [token::SecretKey], key: &str, version: u32) -> &'a token::SecretKey {
    let label = format!("kmsd {key} v{version}");
    let matching: Vec<_> = objects.iter().filter(|o| o.label == label).collect();
    assert_eq!(matching.len(), 1, "objects labelled {label}: {objects:?}");
    let object = matching[0];
    assert!(object.token && object.private, "{object:?}");
    assert!(object.sensitive && object.always_sensitive, "{object:?}");
    assert!(!object.extractable && object.never_extractable, "{object:?}");
    assert!(!object.value_readable, "the token gave the value of {label}");
    assert_eq!(object.id.len(), 16, "{object:?}");
    object
}

#[test]
fn keys_are_made_and_used_inside_the_token_across_restarts() {
    let mut s = setup();
    let (first, second) = (create_key(&s.agent), create_key(&s.agent));
    let context = json!({"purpose": "pkcs11 e2e"});
    let encrypted = encrypt(&s.agent, &first, b"sealed in the token", &context);
    let blob = encrypted["CiphertextBlob"].clone();
    assert_eq!(unb64(&blob)[0], 2, "a blob made in the token is of format 2");
    let out = decrypt(&s.agent, &blob, &context);
    assert_eq!(unb64(&out["Plaintext"]), b"sealed in the token");
    assert!(out["KeyId"].as_str().unwrap().ends_with(&first));
    // Envelope encryption: the data key comes back in the clear and wrapped by the token.
    let data_key = s.agent.ok("GenerateDataKey", json!({"KeyId": first, "KeySpec": "AES_256"}));
    let plaintext_key = unb64(&data_key["Plaintext"]);
    assert_eq!(plaintext_key.len(), 32);
    let wrapped = data_key["CiphertextBlob"].clone();
    assert_eq!(unb64(&decrypt(&s.agent, &wrapped, &json!({}))["Plaintext"]), plaintext_key);
    // ReEncrypt from one token key to the other.
    let moved = s.agent.ok(
        "ReEncrypt",
        json!({"CiphertextBlob": blob, "SourceEncryptionContext": context, "DestinationKeyId": second,
               "DestinationEncryptionContext": context}),
    );
    let out = decrypt(&s.agent, &moved["CiphertextBlob"], &context);
    assert_eq!(unb64(&out["Plaintext"]), b"sealed in the token");
    assert!(out["KeyId"].as_str().unwrap().ends_with(&second));
    // A wrong context is the ciphertext's fault, as with any key.
    let e = s.agent.call("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": {"purpose": "other"}}));
    assert_eq!(e.unwrap_err().kind.as_str(), "InvalidCiphertextException");

    // In the token: one protected object per key version.
    let objects = token::secret_keys(&s.hsm, LABEL, PIN);
    object_of(&objects, &first, 1);
    object_of(&objects, &second, 1);
    // A rotation makes the new version's object there too, and the old one still decrypts.
    s.agent.ok("RotateKeyOnDemand", json!({"KeyId": first}));
    let rotated = encrypt(&s.agent, &first, b"after rotation", &context)["CiphertextBlob"].clone();
    let objects = token::secret_keys(&s.hsm, LABEL, PIN);
    assert_ne!(object_of(&objects, &first, 2).id, object_of(&objects, &first, 1).id);

    s.agent.restart();
    for (blob, context, plaintext) in [
        (&blob, &context, &b"sealed in the token"[..]),
        (&wrapped, &json!({}), &plaintext_key[..]),
        (&moved["CiphertextBlob"], &context, &b"sealed in the token"[..]),
        (&rotated, &context, &b"after rotation"[..]),
    ] {
        assert_eq!(unb64(&decrypt(&s.agent, blob, context)["Plaintext"]), plaintext);
    }
    assert!(s.agent.log().contains(&format!("pkcs11 (token '{LABEL}'")), "{}", s.agent.log());
}

/// `(key ID, version, stored bytes)` of every key version in kmsd's database, read with
/// Python's sqlite3 (Python is a test dependency already, for boto3).
fn stored_material(db: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let script = "import sqlite3, sys\n\
                  for k, v, s in sqlite3.connect(sys.argv[1]).execute('SELECT key_id, version, stored FROM key_material'):\n\
                  \x20   print(k, v, (s or b'').hex())";
    let out =
        Command::new("python3").args(["-c", script]).arg(db).output().expect("python3 (scripts/install-test-deps)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let hex = fields[2];
            let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            (fields[0].to_string(), fields[1].parse().unwrap(), bytes)
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn the_state_directory_holds_only_references_to_token_objects() {
    let mut s = setup();
    let keys: Vec<String> = (0..3).map(|_| create_key(&s.agent)).collect();
    s.agent.ok("RotateKeyOnDemand", json!({"KeyId": keys[0]}));
    s.agent.ok("GenerateDataKey", json!({"KeyId": keys[1], "KeySpec": "AES_256"}));
    let objects = token::secret_keys(&s.hsm, LABEL, PIN);
    s.agent.stop();

    let state = s.agent.state_dir();
    let rows = stored_material(&state.join("kmsd.db"));
    let mut versions: Vec<(String, u32)> = rows.iter().map(|(k, v, _)| (k.clone(), *v)).collect();
    versions.sort();
    let mut expected = vec![(keys[0].clone(), 1), (keys[0].clone(), 2), (keys[1].clone(), 1), (keys[2].clone(), 1)];
    expected.sort();
    assert_eq!(versions, expected);
    for (key, version, stored) in &rows {
        // The 17-byte reference (format 1 ‖ CKA_ID) of the object labelled for this very
        // key version; a wrapped 32-byte key would take at least 48.
        let object = object_of(&objects, key, *version);
        assert_eq!(stored[..], [&[1u8][..], &object.id].concat()[..], "key {key} v{version}");
    }
    let files = files_under(&state);
    for name in ["root.key", "root.kdf"] {
        assert!(!files.iter().any(|f| f.file_name().is_some_and(|n| n == name)), "{name} in {files:?}");
    }
    let record = std::fs::read_to_string(state.join("root-of-trust.json")).expect("root-of-trust.json");
    assert!(record.contains("pkcs11") && record.contains(LABEL), "{record}");
    // The PIN is in no file of the state directory (the record names the PIN file).
    for file in &files {
        let bytes = std::fs::read(file).expect("read state file");
        assert!(!bytes.windows(PIN.len()).any(|w| w == PIN.as_bytes()), "the PIN is in {}", file.display());
    }
    assert!(!s.agent.log().contains(PIN), "the PIN is in kmsd's log");
}

/// kmsd's message on stderr, for assertions.
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_refuses_a_wrong_pin_a_missing_module_and_a_missing_token() {
    let s = prepare();
    let wrong_pin = s.hsm.pin_file("wrong-pin", "not-the-pin");
    let module = s.hsm.module();
    let missing_module = Path::new("/nonexistent/libsofthsm2.so");
    for (module, label, pin_file, expected) in [
        (module.as_path(), LABEL, &wrong_pin, "CKR_PIN_INCORRECT"),
        (missing_module, LABEL, &s.pin_file, "/nonexistent/libsofthsm2.so"),
        (module.as_path(), "no-such-token", &s.pin_file, "no initialized token labelled 'no-such-token'"),
    ] {
        let out = init(&s.agent, module, label, pin_file);
        assert!(!out.status.success(), "init succeeded with {module:?} {label} {pin_file:?}");
        assert!(stderr(&out).contains(expected), "{expected} not in: {}", stderr(&out));
        assert!(!stderr(&out).contains(PIN));
        // Nothing half-written: the directory can still be initialized properly.
        assert!(!s.agent.state_dir().join("root-of-trust.json").exists());
    }
    let out = init(&s.agent, &s.hsm.module(), LABEL, &s.pin_file);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn kmsd_refuses_to_start_on_a_wrong_pin_a_missing_module_or_a_deleted_token() {
    let mut s = setup();
    let key = create_key(&s.agent);
    let blob = encrypt(&s.agent, &key, b"kept", &json!({}))["CiphertextBlob"].clone();
    s.agent.stop();

    let wrong_pin = s.hsm.pin_file("wrong-pin", "not-the-pin");
    let text = s.agent.start_refused(&["--pkcs11-pin-file".as_ref(), wrong_pin.as_os_str()]);
    assert!(text.contains("CKR_PIN_INCORRECT"), "{text}");
    assert!(!text.contains("not-the-pin"), "the PIN was printed: {text}");

    let text = s.agent.start_refused(&[
        "--pkcs11-pin-file".as_ref(),
        s.pin_file.as_os_str(),
        "--pkcs11-module".as_ref(),
        "/nonexistent/lib.so".as_ref(),
    ]);
    assert!(text.contains("/nonexistent/lib.so"), "{text}");

    // Given the right PIN (recorded at init, so no flag is needed), it starts and decrypts.
    s.agent.set_args(&[]);
    s.agent.start_again();
    assert_eq!(unb64(&decrypt(&s.agent, &blob, &json!({}))["Plaintext"]), b"kept");
    s.agent.stop();

    s.hsm.delete_token(LABEL);
    assert!(s.hsm.token_labels().is_empty());
    let text = s.agent.start_refused(&["--pkcs11-pin-file".as_ref(), s.pin_file.as_os_str()]);
    assert!(text.contains(&format!("no initialized token labelled '{LABEL}'")), "{text}");
}

#[test]
fn the_pin_can_come_from_a_systemd_credential() {
    let mut s = setup();
    let key = create_key(&s.agent);
    let blob = encrypt(&s.agent, &key, b"credential", &json!({}))["CiphertextBlob"].clone();
    s.agent.stop();
    // The PIN file recorded at init now holds a wrong PIN; the credential holds the right one.
    std::fs::write(&s.pin_file, "not-the-pin\n").unwrap();
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("kmsd-pkcs11-pin"), format!("{PIN}\n")).unwrap();
    s.agent.set_env("CREDENTIALS_DIRECTORY", credentials.path().to_str().unwrap());
    s.agent.set_args(&[]);
    s.agent.start_again();
    assert_eq!(unb64(&decrypt(&s.agent, &blob, &json!({}))["Plaintext"]), b"credential");
}
