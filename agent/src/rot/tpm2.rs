//! The `tpm2` root of trust (being written).
//!
//! SKELETON written by the lead so that the tree builds while the kmsd glue
//! (rot/setup.rs) lands: the signatures are the agreed API; replace this file wholesale.

use std::path::Path;

use kmsfs_common::aead::KeyBytes;
use zeroize::Zeroizing;

pub struct TpmOptions {
    pub tcti: String,
    pub pcrs: Vec<u8>,
    pub auth: Option<Zeroizing<Vec<u8>>>,
}

pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

const NOT_YET: &str = "the tpm2 backend is not built yet";

pub fn parse_pcrs(_text: &str) -> Result<Vec<u8>, String> {
    Err(NOT_YET.into())
}

pub fn init(_state_dir: &Path, _opts: &TpmOptions, _root_key: &KeyBytes, _recovery: &str) -> Result<(), String> {
    Err(NOT_YET.into())
}

pub fn unseal(_state_dir: &Path, _tcti: &str, _auth: Option<&[u8]>) -> Result<KeyBytes, String> {
    Err(NOT_YET.into())
}

pub fn recover(_state_dir: &Path, _recovery: &str) -> Result<KeyBytes, String> {
    Err(NOT_YET.into())
}

pub fn reseal(
    _state_dir: &Path,
    _opts: &TpmOptions,
    _root_key: &KeyBytes,
    _recovery: Option<&str>,
) -> Result<(), String> {
    Err(NOT_YET.into())
}

pub fn describe(_state_dir: &Path, tcti: &str) -> String {
    format!("tpm2 ({tcti})")
}
