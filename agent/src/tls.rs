//! TLS on the TCP listener (rustls, on aws-lc-rs): the server's certificate and key, the
//! optional client CA of mutual TLS, and the identity a verified client certificate names.
//!
//! Files are PEM. A private key file is refused if group or others may read or write it,
//! or if it belongs to neither kmsd's user nor root, as `access-keys.json` is. Errors name
//! the file and what was wrong with it, never key bytes.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificate chain in the PEM file `path`, end-entity first.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let _ = path;
    Err("not implemented yet".into())
}

/// The private key in the PEM file `path` (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let _ = path;
    Err("not implemented yet".into())
}

/// The trust anchors in the PEM file `path`.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let _ = path;
    Err("not implemented yet".into())
}

/// A server configuration presenting `cert` with `key`; with `client_ca`, every client
/// must present a certificate that chains to it.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<rustls::ServerConfig>, String> {
    let _ = (cert, key, client_ca);
    Err("not implemented yet".into())
}

/// The identity a certificate names: its first DNS subjectAltName, else its subject's
/// common name.
pub fn certificate_identity(cert: &CertificateDer) -> Option<String> {
    let _ = cert;
    None
}
