//! Certificates for the TLS tests, made with rcgen: a CA ([`TestCa`]) that issues server
//! certificates for IP or DNS names, client certificates for an identity, and expired ones,
//! each written as PEM files (`<name>.pem`, and `<name>.key` with mode 0600) into a
//! directory the test owns.
//!
//! Validity periods are fixed dates far from today (2020 to 2090, or 2001 to 2002 for an
//! expired certificate), so that no test depends on the clock beyond "it is after 2020".

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (`<name>.pem`).
    pub cert: PathBuf,
    /// The private key (`<name>.key`, mode 0600).
    pub key: PathBuf,
}

/// What a leaf certificate is for, and when it is valid.
#[derive(Debug, Clone, Default)]
pub struct Leaf {
    /// subjectAltNames: IP addresses (`127.0.0.1`, `::1`) or DNS names.
    pub sans: Vec<String>,
    /// The subject's common name (default: the file name).
    pub common_name: Option<String>,
    /// Extended key usage serverAuth.
    pub server: bool,
    /// Extended key usage clientAuth.
    pub client: bool,
    /// Valid only in 2001: expired long ago.
    pub expired: bool,
}

/// A certificate authority for one test, writing everything it issues into its directory.
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, `<name>.pem`: what clients trust (`--ca-bundle`,
    /// `AWS_CA_BUNDLE`, `verify=`) and what `--tls-client-ca` names.
    pub cert: PathBuf,
}

impl TestCa {
    /// A new CA named `name` (its certificate in `dir/<name>.pem`).
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("kmsfs test CA {name}"));
        params.distinguished_name.push(DnType::OrganizationName, "kmsfs tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2090, 1, 1);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA certificate");
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).expect("write CA certificate");
        TestCa { dir: dir.to_path_buf(), issuer: Issuer::new(params, key), cert: path }
    }

    /// A server certificate named `name` for `sans` (IP addresses or DNS names).
    pub fn server(&self, name: &str, sans: &[&str]) -> CertFiles {
        self.issue(name, &Leaf { sans: sans.iter().map(|s| s.to_string()).collect(), server: true, ..Leaf::default() })
    }

    /// A client certificate whose identity is `identity`: its only DNS subjectAltName and
    /// its common name (files `<identity>.pem`, `<identity>.key`).
    pub fn client(&self, identity: &str) -> CertFiles {
        self.issue(identity, &Leaf { sans: vec![identity.to_string()], client: true, ..Leaf::default() })
    }

    /// A certificate as `leaf` describes, named `name`.
    pub fn issue(&self, name: &str, leaf: &Leaf) -> CertFiles {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, leaf.common_name.clone().unwrap_or_else(|| name.into()));
        params.subject_alt_names = leaf
            .sans
            .iter()
            .map(|s| match s.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(s.clone().try_into().expect("a DNS name")),
            })
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if leaf.server {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if leaf.client {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = match leaf.expired {
            true => (date_time_ymd(2001, 1, 1), date_time_ymd(2002, 1, 1)),
            false => (date_time_ymd(2020, 1, 1), date_time_ymd(2090, 1, 1)),
        };
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed certificate");
        let files = CertFiles { cert: self.dir.join(format!("{name}.pem")), key: self.dir.join(format!("{name}.key")) };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        write_private(&files.key, &key.serialize_pem());
        files
    }
}

/// Writes a private key file as kmsd wants it: mode 0600 from the start.
fn write_private(path: &Path, pem: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).expect("create key file");
    file.write_all(pem.as_bytes()).expect("write key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key file");
}
