//! TLS on the TCP listener (rustls, on aws-lc-rs): the server's certificate and key, the
//! optional client CA of mutual TLS, and the identity a verified client certificate names.
//!
//! Files are PEM. A private key file is refused if group or others may read or write it,
//! or if it belongs to neither kmsd's user nor root, as `access-keys.json` is. Errors name
//! the file and what was wrong with it, never key bytes.
//!
//! With a client CA, every connection must present a client certificate that chains to it
//! (rustls's WebPKI verifier: signature chain, validity dates, client-auth usage). The
//! certificate's identity ([`certificate_identity`]) then becomes the principal
//! `arn:aws:iam::<account>:role/tls/<identity>` of every request on the connection, beside
//! the access key's.
//!
//! [`TlsSettings`] holds the configuration in force; SIGHUP reloads it from the same files,
//! and a reload that fails leaves the previous one serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The rule an identity follows, for messages.
pub const IDENTITY_RULE: &str =
    "must be 1 to 253 letters, digits and -_.@, not starting with '.' (such as host-b or host-b.example.com)";

/// The one protocol spoken inside TLS.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Whether `identity` can name a principal (`role/tls/<identity>`) and an identity policy
/// file (`roles/tls/<identity>.json`).
pub fn is_valid_identity(identity: &str) -> bool {
    (1..=253).contains(&identity.len())
        && !identity.starts_with('.')
        && identity.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// The certificate chain in the PEM file `path`, end-entity first.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| at(&pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| at(&pem_error(e)))?;
    if certs.is_empty() {
        return Err(at(&"no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\" blocks)"));
    }
    for (i, cert) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(cert.as_ref()) {
            return Err(at(&format!("certificate {} is not a valid X.509 certificate: {e}", i + 1)));
        }
    }
    Ok(certs)
}

/// The private key in the PEM file `path` (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = crate::access_keys::read_private_file(path, "a TLS private key")?
        .ok_or_else(|| format!("{}: no such file", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "{}: no private key in it (expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)",
            path.display()
        ),
        e => format!("{}: {}", path.display(), pem_error(e)),
    })
}

/// The trust anchors in the PEM file `path`.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in load_certs(path)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("{}: certificate {} cannot be a trust anchor: {e}", path.display(), i + 1))?;
    }
    Ok(roots)
}

/// A server configuration presenting `cert` with `key`; with `client_ca`, every client
/// must present a certificate that chains to it.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = load_certs(cert)?;
    warn_if_not_current(cert, &chain[0]);
    let private_key = load_private_key(key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, private_key).map_err(|e| {
        format!("{} and {} do not make a usable certificate and key: {e}", cert.display(), key.display())
    })?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// Warns when the server's certificate is outside its validity period: clients will refuse
/// it, but a renewal and a SIGHUP fix that without a restart.
fn warn_if_not_current(path: &Path, cert: &CertificateDer) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return };
    let validity = parsed.validity();
    let now = kmsfs_common::time::now_millis() / 1000;
    if validity.not_after.timestamp() < now {
        tracing::warn!(certificate = %path.display(), not_after = %validity.not_after, "the TLS certificate has EXPIRED: clients will refuse it");
    } else if validity.not_before.timestamp() > now {
        tracing::warn!(certificate = %path.display(), not_before = %validity.not_before, "the TLS certificate is not valid yet: clients will refuse it");
    }
}

/// A PEM error without the crate's debug formatting.
fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "no PEM block in it".to_string(),
        Error::MissingSectionEnd { .. } => "a PEM block has no END line".to_string(),
        Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_string(),
        Error::Base64Decode(_) => "a PEM block is not valid base64".to_string(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// The identity a certificate names: its first DNS subjectAltName, else its subject's
/// common name. `None` if it names neither, or if what it names is not a usable identity
/// ([`is_valid_identity`]: a wildcard, say).
pub fn certificate_identity(cert: &CertificateDer) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let dns = parsed.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_string()),
            _ => None,
        })
    });
    let name = match dns {
        Some(dns) => dns,
        None => parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string(),
    };
    is_valid_identity(&name).then_some(name)
}

/// Where the TLS configuration comes from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA client certificates must chain to (mutual TLS), if any.
    pub client_ca: Option<PathBuf>,
}

/// The TLS configuration in force on the TCP listeners, reloadable from its files.
pub struct TlsSettings {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsSettings {
    /// Loads `files`, or says which one is wrong and why.
    pub fn load(files: TlsFiles) -> Result<TlsSettings, String> {
        let config = server_config(&files.cert, &files.key, files.client_ca.as_deref())?;
        Ok(TlsSettings { files, current: RwLock::new(config) })
    }

    /// Reads the files again (a renewed certificate, say); on error the previous
    /// configuration stays in force.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.files.cert, &self.files.key, self.files.client_ca.as_deref())?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_names_fit_for_an_arn_and_a_file() {
        for good in ["host-b", "host-b.example.com", "svc_1@site", "a"] {
            assert!(is_valid_identity(good), "{good}");
        }
        for bad in ["", "*.example.com", "../x", ".hidden", "a/b", "a b", "a:b", &"x".repeat(254)] {
            assert!(!is_valid_identity(bad), "{bad}");
        }
    }

    #[test]
    fn bad_files_are_refused_naming_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        assert!(load_certs(&missing).expect_err("refused").contains("missing.pem"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = load_certs(&empty).expect_err("refused");
        assert!(e.contains("empty.pem") && e.contains("no certificate"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("write");
        let e = load_certs(&garbage).expect_err("refused");
        assert!(e.contains("garbage.pem") && e.contains("not a valid X.509"), "{e}");

        let key = dir.path().join("key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = load_private_key(&key).expect_err("refused");
        assert!(e.contains("key.pem") && e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(load_private_key(&key).is_ok(), "a well-formed PEM block is a key to rustls until it is used");
        std::fs::write(&key, "nothing\n").expect("write");
        let e = load_private_key(&key).expect_err("refused");
        assert!(e.contains("key.pem") && e.contains("no private key"), "{e}");
    }
}
