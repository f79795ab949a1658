//! The `pkcs11` root of trust (being written).
//!
//! SKELETON written by the lead so that the tree builds while the kmsd glue
//! (rot/setup.rs) lands: the signatures are the agreed API; replace this file wholesale.

use std::path::PathBuf;
use std::sync::Arc;

use kmsfs_common::aead::KeyBytes;
use kmsfs_common::ids::KeyId;
use kmsfs_common::KmsError;
use zeroize::Zeroizing;

use super::{KeyMaterial, RootOfTrust};

pub struct TokenConfig {
    pub module: PathBuf,
    pub token_label: String,
    pub pin: Zeroizing<String>,
}

#[derive(Debug)]
pub enum ConnectError {
    ModuleNotLoaded(String),
    TokenNotFound(String),
    IncorrectPin,
    PinLocked,
    PinNotInitialized,
    MechanismMissing(String),
    Other(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl ConnectError {
    pub fn connection_error_code(&self) -> &'static str {
        "INTERNAL_ERROR"
    }
}

pub struct Token;

impl Token {
    pub fn connect(_config: &TokenConfig) -> Result<Arc<Token>, ConnectError> {
        Err(ConnectError::Other("the pkcs11 backend is not built yet".into()))
    }
    pub fn describe(&self) -> String {
        "pkcs11".into()
    }
    pub fn close(&self) {}
}

pub struct Pkcs11Root {
    token: Arc<Token>,
}

impl Pkcs11Root {
    pub fn new(token: Arc<Token>) -> Pkcs11Root {
        Pkcs11Root { token }
    }
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }
}

impl RootOfTrust for Pkcs11Root {
    fn describe(&self) -> String {
        self.token.describe()
    }
    fn generate(&self, _: &KeyId, _: u32) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError> {
        Err(KmsError::internal("not built yet"))
    }
    fn import(&self, _: &KeyId, _: u32, _: &KeyBytes) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError> {
        Err(KmsError::internal("not built yet"))
    }
    fn load(&self, _: &KeyId, _: u32, _: &[u8]) -> Result<Arc<dyn KeyMaterial>, KmsError> {
        Err(KmsError::internal("not built yet"))
    }
}
