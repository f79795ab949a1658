//! The one error type of the API: its kinds are the exception names of AWS KMS's service
//! model (and the common errors of AWS's authentication layer, which a SigV4 request can
//! meet before reaching KMS), and `to_wire` is the single place where an error becomes the
//! JSON 1.1 error body.

use std::fmt;

macro_rules! error_kinds {
    ($($name:ident),* $(,)?) => {
        /// An AWS KMS exception name, as it appears in `__type` on the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(clippy::enum_variant_names)]
        pub enum ErrorKind { $($name),* }

        impl ErrorKind {
            /// The exception's wire name.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorKind::$name => stringify!($name)),* }
            }

            /// Parses a wire name; AWS sometimes prefixes it with a namespace (`ns#Name`).
            pub fn from_wire(s: &str) -> Option<ErrorKind> {
                let name = s.rsplit('#').next().unwrap_or(s);
                let name = name.split(':').next().unwrap_or(name);
                match name { $(stringify!($name) => Some(ErrorKind::$name),)* _ => None }
            }
        }
    };
}

error_kinds! {
    AccessDeniedException,
    AlreadyExistsException,
    CloudHsmClusterInUseException,
    CloudHsmClusterInvalidConfigurationException,
    CloudHsmClusterNotActiveException,
    CloudHsmClusterNotFoundException,
    CloudHsmClusterNotRelatedException,
    ConflictException,
    CustomKeyStoreHasCMKsException,
    CustomKeyStoreInvalidStateException,
    CustomKeyStoreNameInUseException,
    CustomKeyStoreNotFoundException,
    DependencyTimeoutException,
    DisabledException,
    DryRunOperationException,
    ExpiredImportTokenException,
    IncompleteSignatureException,
    IncorrectKeyException,
    IncorrectKeyMaterialException,
    IncorrectTrustAnchorException,
    InvalidAliasNameException,
    InvalidArnException,
    InvalidCiphertextException,
    InvalidGrantIdException,
    InvalidGrantTokenException,
    InvalidImportTokenException,
    InvalidKeyUsageException,
    InvalidMarkerException,
    InvalidSignatureException,
    KeyUnavailableException,
    KMSInternalException,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    MissingAuthenticationTokenException,
    NotFoundException,
    SerializationException,
    TagException,
    UnknownOperationException,
    UnrecognizedClientException,
    UnsupportedOperationException,
    ValidationException,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as the API reports it: an exception name and a message for humans.
///
/// Messages never carry key material or plaintext; callers build them from identifiers only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsError {
    pub kind: ErrorKind,
    pub message: String,
}

impl KmsError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> KmsError {
        KmsError { kind, message: message.into() }
    }

    pub fn validation(message: impl Into<String>) -> KmsError {
        KmsError::new(ErrorKind::ValidationException, message)
    }

    pub fn not_found(message: impl Into<String>) -> KmsError {
        KmsError::new(ErrorKind::NotFoundException, message)
    }

    pub fn internal(message: impl Into<String>) -> KmsError {
        KmsError::new(ErrorKind::KMSInternalException, message)
    }

    pub fn invalid_state(message: impl Into<String>) -> KmsError {
        KmsError::new(ErrorKind::KMSInvalidStateException, message)
    }

    pub fn invalid_ciphertext() -> KmsError {
        KmsError::new(
            ErrorKind::InvalidCiphertextException,
            "The ciphertext is invalid, was not made by this service, or its encryption context does not match",
        )
    }

    /// The JSON 1.1 error body: `{"__type": "...", "message": "..."}`.
    pub fn to_wire(&self) -> serde_json::Value {
        serde_json::json!({ "__type": self.kind.as_str(), "message": self.message })
    }

    /// Reads an error body sent by the agent (or by AWS).
    pub fn from_wire(body: &serde_json::Value) -> Option<KmsError> {
        let ty = body.get("__type")?.as_str()?;
        let message =
            body.get("message").or_else(|| body.get("Message")).and_then(|m| m.as_str()).unwrap_or("").to_string();
        match ErrorKind::from_wire(ty) {
            Some(kind) => Some(KmsError { kind, message }),
            None => Some(KmsError::internal(format!("{ty}: {message}"))),
        }
    }
}

impl fmt::Display for KmsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for KmsError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_and_namespaced_names() {
        let e = KmsError::not_found("no such key");
        assert_eq!(KmsError::from_wire(&e.to_wire()), Some(e));
        assert_eq!(ErrorKind::from_wire("com.amazonaws.kms#DisabledException"), Some(ErrorKind::DisabledException));
        assert_eq!(ErrorKind::from_wire("Nope"), None);
    }
}
