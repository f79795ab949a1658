//! kmsctl's command line: global flags and one subcommand per KMS action, named and flagged
//! as `aws kms` names them, so that `aws kms` habits and scripts carry over.

use std::path::PathBuf;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::args::{self, ArgvSecret, Blob, Context, GrantConstraints, GrantOperations, TagKeys, TagList, Timestamp};

/// The help heading of the flags every subcommand takes.
const GLOBAL: &str = "Global options";

/// Examples and exit codes, shown after the subcommand list.
const AFTER_HELP: &str = "\
Blob arguments (--plaintext, --ciphertext-blob, --message, --signature, --mac, --import-token,
--encrypted-key-material) are base64, or fileb://PATH for a file's raw bytes. Without them,
encrypt, decrypt and re-encrypt, and sign and generate-mac without --message, read raw bytes
from stdin and write the raw result to stdout:

  kmsctl encrypt -k alias/app < secret > secret.enc
  kmsctl decrypt < secret.enc > secret
  kmsctl sign -k alias/signer --signing-algorithm ECDSA_SHA_256 < msg > msg.sig

`get-public-key --output pem` prints the public key as a PEM block that openssl reads:

  kmsctl get-public-key -k alias/signer --output pem > pub.pem
  openssl dgst -sha256 -verify pub.pem -signature msg.sig msg

The key store password of create-custom-key-store and update-custom-key-store is never a
command-line value (process lists show those): it is read from --key-store-password-file, or
from stdin, with a prompt that does not echo when stdin is a terminal.

Exit codes: 0 success, 252 usage error, 254 error returned by the service, 255 any other error.";

/// Command-line client of kmsd, the local key management daemon speaking AWS KMS's API.
/// Subcommands and flags follow `aws kms`.
#[derive(Debug, Parser)]
#[command(
    name = "kmsctl",
    version,
    subcommand_required = true,
    arg_required_else_help = true,
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// The agent's socket. Without it, kmsctl finds the system or per-user agent and starts
    /// a per-user agent if none answers. An empty value counts as none.
    #[arg(
        long,
        global = true,
        env = "KMSD_SOCKET",
        value_name = "PATH",
        help_heading = GLOBAL,
        // Unlike clap's `PathBuf` parser, accept an empty value: an exported but empty
        // `KMSD_SOCKET` must not make every command a usage error.
        value_parser = OsStringValueParser::new().map(PathBuf::from)
    )]
    pub socket: Option<PathBuf>,

    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Json, help_heading = GLOBAL)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: TopCommand,
}

/// kmsctl's subcommands: the KMS actions, and the audit trail's tools.
#[derive(Debug, Subcommand)]
pub enum TopCommand {
    #[command(flatten)]
    Kms(Command),
    /// The agent's audit trail: verify it, query it, export its public key.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `kmsctl audit ...`: these read the audit files directly. Without --dir and --public-key,
/// the agent names its audit directory and public key (Kmsfs.GetAuditInfo).
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Prints the audit signing key's public half (base64 of the 32-byte Ed25519 key). Keep
    /// a copy off the machine to verify copies of the log with --public-key.
    PublicKey,
    /// Proves a range of audit files untampered, or names the first line that was modified,
    /// inserted, deleted, reordered or cut off. Exit 0: verified; 1: tampered; other: error.
    Verify(AuditVerify),
    /// Prints the records that match every filter given, as JSON lines or a table.
    Query(AuditQuery),
}

/// Which audit files, and with which key.
#[derive(Debug, Args)]
pub struct AuditSource {
    /// A directory of audit files (e.g. a copy from another machine) instead of the agent's.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The trusted public key: base64, or file://PATH holding it (as `audit public-key`
    /// prints it). Default: the agent's.
    #[arg(long, value_name = "KEY", value_parser = args::text)]
    pub public_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct AuditVerify {
    #[command(flatten)]
    pub source: AuditSource,
    /// The first day to verify (YYYY-MM-DD, UTC). Default: the first file.
    #[arg(long, value_name = "DATE")]
    pub from: Option<String>,
    /// The last day to verify (YYYY-MM-DD, UTC). Default: the last file.
    #[arg(long, value_name = "DATE")]
    pub to: Option<String>,
}

/// How query results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryFormat {
    /// One record per line, exactly as stored.
    Jsonl,
    /// Aligned columns: time, action, outcome, principal, key.
    Table,
}

/// Whether a request succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Outcome {
    Success,
    /// Any error, denials included.
    Failure,
    /// AccessDeniedException only.
    Denied,
}

#[derive(Debug, Args)]
pub struct AuditQuery {
    /// A directory of audit files instead of the agent's.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Records from this time on (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS[.mmm]Z, UTC).
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Records up to this time (a bare date includes that whole day).
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// Records naming this key (key ID, key ARN, or the alias the request used).
    #[arg(short = 'k', long, value_name = "KEY_ID")]
    pub key_id: Option<String>,
    /// Records by this principal (ARN, user name, role ARN or access key ID).
    #[arg(long, value_name = "PRINCIPAL")]
    pub principal: Option<String>,
    /// Records of this action (eventName, e.g. Decrypt).
    #[arg(long, value_name = "ACTION")]
    pub action: Option<String>,
    #[arg(long, value_enum)]
    pub outcome: Option<Outcome>,
    #[arg(long, value_enum, default_value_t = QueryFormat::Jsonl)]
    pub format: QueryFormat,
}

/// How responses are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Pretty-printed JSON, as `aws --output json`.
    Json,
    /// Tab-separated lines, as `aws --output text`.
    Text,
    /// Boxed tables for people, as `aws --output table`.
    Table,
    /// get-public-key only: the public key as a PEM `PUBLIC KEY` block (what openssl reads).
    Pem,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Creates a KMS key.
    CreateKey(CreateKey),
    /// Shows a KMS key's metadata.
    DescribeKey(DescribeKey),
    /// Lists the KMS keys.
    ListKeys(Pages),
    /// Enables a KMS key.
    EnableKey(KeyIdArg),
    /// Disables a KMS key, so that it cannot be used in cryptographic operations.
    DisableKey(KeyIdArg),
    /// Replaces a KMS key's description.
    UpdateKeyDescription(UpdateKeyDescription),
    /// Schedules a KMS key for deletion after a waiting period. When it ends, the key material
    /// is destroyed and everything encrypted under the key can never be decrypted again.
    ScheduleKeyDeletion(ScheduleKeyDeletion),
    /// Cancels a KMS key's scheduled deletion; the key is left disabled.
    CancelKeyDeletion(KeyIdArg),
    /// Shows when a KMS key was last used for a cryptographic operation, and for which.
    GetKeyLastUsage(KeyIdArg),
    /// Turns on automatic rotation of a KMS key's material.
    EnableKeyRotation(EnableKeyRotation),
    /// Turns off automatic rotation of a KMS key's material.
    DisableKeyRotation(KeyIdArg),
    /// Shows whether a KMS key's material is rotated automatically, how often and when next.
    GetKeyRotationStatus(KeyIdArg),
    /// Rotates a KMS key's material now; ciphertexts under its earlier material still decrypt.
    RotateKeyOnDemand(KeyIdArg),
    /// Lists a KMS key's rotations (and, on request, its original material).
    ListKeyRotations(ListKeyRotations),
    /// Returns the public key to wrap key material with and the import token to import it
    /// with, for a KMS key whose origin is EXTERNAL.
    GetParametersForImport(GetParametersForImport),
    /// Imports key material, wrapped under get-parameters-for-import's public key, into a KMS
    /// key whose origin is EXTERNAL.
    ImportKeyMaterial(ImportKeyMaterial),
    /// Deletes imported key material; the key is unusable until the material is imported again.
    DeleteImportedKeyMaterial(DeleteImportedKeyMaterial),
    /// Creates an alias for a KMS key.
    CreateAlias(AliasTarget),
    /// Points an existing alias at another KMS key.
    UpdateAlias(AliasTarget),
    /// Deletes an alias.
    DeleteAlias(AliasNameArg),
    /// Lists aliases, all of them or a KMS key's.
    ListAliases(ListAliases),
    /// Adds or overwrites tags on a KMS key.
    TagResource(TagResource),
    /// Removes tags from a KMS key.
    UntagResource(UntagResource),
    /// Lists a KMS key's tags.
    ListResourceTags(KeyPages),
    /// Replaces a KMS key's key policy.
    PutKeyPolicy(PutKeyPolicy),
    /// Shows a KMS key's key policy.
    GetKeyPolicy(GetKeyPolicy),
    /// Lists the names of a KMS key's key policies (there is one, named default).
    ListKeyPolicies(KeyPages),
    /// Gives a principal permission to use a KMS key for some operations.
    CreateGrant(CreateGrant),
    /// Lists a KMS key's grants.
    ListGrants(ListGrants),
    /// Lists the grants a principal may retire, across all KMS keys.
    ListRetirableGrants(ListRetirableGrants),
    /// Retires a grant, identified by its grant token or by its key and grant ID.
    RetireGrant(RetireGrant),
    /// Revokes a grant.
    RevokeGrant(RevokeGrant),
    /// Encrypts plaintext (from --plaintext, or raw from stdin) under a KMS key.
    Encrypt(Encrypt),
    /// Decrypts a ciphertext blob (from --ciphertext-blob, or raw from stdin).
    Decrypt(Decrypt),
    /// Decrypts a ciphertext blob and encrypts the plaintext again under another key.
    ReEncrypt(ReEncrypt),
    /// Generates a data key: its plaintext and its ciphertext under a KMS key.
    GenerateDataKey(GenerateDataKey),
    /// Generates a data key and returns only its ciphertext under a KMS key.
    GenerateDataKeyWithoutPlaintext(GenerateDataKey),
    /// Generates a data key pair: its public key, and its private key both in plaintext and
    /// encrypted under a symmetric KMS key.
    GenerateDataKeyPair(GenerateDataKeyPair),
    /// Generates a data key pair and returns only its public key and its private key
    /// encrypted under a symmetric KMS key.
    GenerateDataKeyPairWithoutPlaintext(GenerateDataKeyPair),
    /// Returns random bytes.
    GenerateRandom(GenerateRandom),
    /// Signs a message (from --message, or raw from stdin) with an asymmetric KMS key of
    /// usage SIGN_VERIFY.
    Sign(Sign),
    /// Verifies a signature made by sign; an invalid one is KMSInvalidSignatureException.
    Verify(Verify),
    /// Returns the public key of an asymmetric KMS key (DER SubjectPublicKeyInfo, or PEM with
    /// --output pem).
    GetPublicKey(GetPublicKey),
    /// Computes the HMAC of a message (from --message, or raw from stdin) with an HMAC KMS key.
    GenerateMac(GenerateMac),
    /// Verifies a MAC made by generate-mac; an invalid one is KMSInvalidMacException.
    VerifyMac(VerifyMac),
    /// Derives the ECDH shared secret of a KEY_AGREEMENT KMS key's private key and another
    /// party's public key.
    DeriveSharedSecret(DeriveSharedSecret),
    /// Replicates a multi-Region primary key to the agent of another region (a peer named in
    /// kmsd's peers.json): same key ID and material, its own policy, description and tags.
    ReplicateKey(ReplicateKey),
    /// Makes the replica of a multi-Region key in another region its primary key, and this
    /// one a replica.
    UpdatePrimaryRegion(UpdatePrimaryRegion),
    /// Creates a custom key store (type AWS_CLOUDHSM) on a PKCS#11 token that kmsd's
    /// hsm-clusters.json declares under a CloudHSM cluster ID. It starts DISCONNECTED.
    CreateCustomKeyStore(CreateCustomKeyStore),
    /// Shows custom key stores: all of them, or the one with the ID or name given.
    DescribeCustomKeyStores(DescribeCustomKeyStores),
    /// Connects a custom key store: kmsd logs in to its token, and its KMS keys become usable.
    ConnectCustomKeyStore(CustomKeyStoreIdArg),
    /// Disconnects a custom key store: kmsd logs out of its token, and its KMS keys become
    /// unusable at once, until it is connected again.
    DisconnectCustomKeyStore(CustomKeyStoreIdArg),
    /// Renames a custom key store, or (while it is DISCONNECTED) changes its password or cluster.
    UpdateCustomKeyStore(UpdateCustomKeyStore),
    /// Deletes a DISCONNECTED custom key store that holds no KMS keys.
    DeleteCustomKeyStore(CustomKeyStoreIdArg),
}

#[derive(Debug, Args)]
pub struct KeyIdArg {
    /// The key: key ID, key ARN, alias name (alias/...) or alias ARN.
    #[arg(short = 'k', long, value_name = "KEY_ID")]
    pub key_id: String,
}

#[derive(Debug, Args)]
pub struct GrantTokensArg {
    /// Grant tokens to present with the request.
    #[arg(long, num_args = 1.., value_name = "TOKEN")]
    pub grant_tokens: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DryRunArg {
    /// Check permissions and parameters without performing the operation; the service
    /// answers with DryRunOperationException when the call would have succeeded.
    #[arg(long, overrides_with = "no_dry_run")]
    pub dry_run: bool,
    /// Perform the operation (the default).
    #[arg(long, overrides_with = "dry_run")]
    pub no_dry_run: bool,
}

#[derive(Debug, Args)]
pub struct BypassLockoutArg {
    /// Skip the check that the policy does not lock the caller out.
    #[arg(long, overrides_with = "no_bypass_policy_lockout_safety_check")]
    pub bypass_policy_lockout_safety_check: bool,
    /// Keep the policy lockout safety check (the default).
    #[arg(long, overrides_with = "bypass_policy_lockout_safety_check")]
    pub no_bypass_policy_lockout_safety_check: bool,
}

#[derive(Debug, Args)]
pub struct PageArgs {
    /// The most items to return in one page; implies --no-paginate.
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Start after this NextMarker from a previous page; implies --no-paginate.
    #[arg(long, value_name = "MARKER")]
    pub marker: Option<String>,
    /// Send one request and print that page, NextMarker and Truncated included, rather than
    /// following NextMarker through every page.
    #[arg(long)]
    pub no_paginate: bool,
}

#[derive(Debug, Args)]
pub struct Pages {
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct CreateKey {
    /// The key's policy document (JSON, or file://PATH).
    #[arg(long, value_parser = args::text, value_name = "POLICY")]
    pub policy: Option<String>,
    /// A description of the key.
    #[arg(long, value_parser = args::text)]
    pub description: Option<String>,
    /// What the key is for: ENCRYPT_DECRYPT, SIGN_VERIFY, GENERATE_VERIFY_MAC, KEY_AGREEMENT.
    #[arg(long, value_name = "KEY_USAGE")]
    pub key_usage: Option<String>,
    /// The key's type, e.g. SYMMETRIC_DEFAULT (the default), HMAC_256, RSA_2048.
    #[arg(long, value_name = "KEY_SPEC")]
    pub key_spec: Option<String>,
    /// Deprecated name of --key-spec.
    #[arg(long, value_name = "KEY_SPEC")]
    pub customer_master_key_spec: Option<String>,
    /// Where the key material comes from: AWS_KMS (the default), EXTERNAL (imported), or
    /// AWS_CLOUDHSM (generated in the token of the custom key store --custom-key-store-id).
    #[arg(long, value_name = "ORIGIN")]
    pub origin: Option<String>,
    /// The custom key store to create the key in (with --origin AWS_CLOUDHSM).
    #[arg(long, value_name = "CUSTOM_KEY_STORE_ID")]
    pub custom_key_store_id: Option<String>,
    #[command(flatten)]
    pub bypass: BypassLockoutArg,
    /// Tags: TagKey=KEY,TagValue=VALUE (repeatable) or a JSON list of {"TagKey","TagValue"}.
    #[arg(long, num_args = 1.., value_parser = args::tags, value_name = "TAG")]
    pub tags: Vec<TagList>,
    /// Create a multi-Region primary key.
    #[arg(long, overrides_with = "no_multi_region")]
    pub multi_region: bool,
    /// Create a single-Region key (the default).
    #[arg(long, overrides_with = "multi_region")]
    pub no_multi_region: bool,
}

#[derive(Debug, Args)]
pub struct DescribeKey {
    #[command(flatten)]
    pub key: KeyIdArg,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
}

#[derive(Debug, Args)]
pub struct UpdateKeyDescription {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The new description.
    #[arg(long, value_parser = args::text)]
    pub description: String,
}

#[derive(Debug, Args)]
pub struct ScheduleKeyDeletion {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// Days to wait before deleting the key, 7 to 30 (default 30).
    #[arg(long, value_name = "DAYS")]
    pub pending_window_in_days: Option<u32>,
}

#[derive(Debug, Args)]
pub struct EnableKeyRotation {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// Days between automatic rotations, 90 to 2560 (default 365).
    #[arg(long, value_name = "DAYS")]
    pub rotation_period_in_days: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ListKeyRotations {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// ROTATIONS_ONLY (the default) or ALL_KEY_MATERIAL, which also lists the key's original
    /// material and any imported material not yet made current.
    #[arg(long, value_name = "INCLUDE")]
    pub include_key_material: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct GetParametersForImport {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// How the key material will be wrapped, e.g. RSAES_OAEP_SHA_256 or
    /// RSA_AES_KEY_WRAP_SHA_256.
    #[arg(long, value_name = "ALGORITHM")]
    pub wrapping_algorithm: String,
    /// The wrapping public key's type: RSA_2048, RSA_3072 or RSA_4096.
    #[arg(long, value_name = "KEY_SPEC")]
    pub wrapping_key_spec: String,
}

#[derive(Debug, Args)]
pub struct ImportKeyMaterial {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The import token from get-parameters-for-import: base64, or fileb://PATH.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub import_token: Blob,
    /// The key material wrapped under get-parameters-for-import's public key: base64, or
    /// fileb://PATH.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub encrypted_key_material: Blob,
    /// When the material expires and is deleted (with --expiration-model KEY_MATERIAL_EXPIRES):
    /// ISO 8601 such as 2030-01-01T00:00:00Z, a date (midnight UTC), or seconds since the epoch.
    #[arg(long, value_parser = args::timestamp, value_name = "TIMESTAMP")]
    pub valid_to: Option<Timestamp>,
    /// KEY_MATERIAL_EXPIRES (give --valid-to) or KEY_MATERIAL_DOES_NOT_EXPIRE.
    #[arg(long, value_name = "MODEL")]
    pub expiration_model: Option<String>,
    /// NEW_KEY_MATERIAL (material for a rotation) or EXISTING_KEY_MATERIAL (re-importing
    /// material the key has had).
    #[arg(long, value_name = "IMPORT_TYPE")]
    pub import_type: Option<String>,
    /// A description of the material.
    #[arg(long, value_name = "DESCRIPTION")]
    pub key_material_description: Option<String>,
    /// The ID of the material being re-imported (with EXISTING_KEY_MATERIAL).
    #[arg(long, value_name = "KEY_MATERIAL_ID")]
    pub key_material_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeleteImportedKeyMaterial {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The material to delete (default: the current material).
    #[arg(long, value_name = "KEY_MATERIAL_ID")]
    pub key_material_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct AliasTarget {
    /// The alias name, alias/NAME.
    #[arg(long, value_name = "ALIAS_NAME")]
    pub alias_name: String,
    /// The key the alias points to: key ID or key ARN.
    #[arg(long, value_name = "KEY_ID")]
    pub target_key_id: String,
}

#[derive(Debug, Args)]
pub struct AliasNameArg {
    /// The alias name, alias/NAME.
    #[arg(long, value_name = "ALIAS_NAME")]
    pub alias_name: String,
}

#[derive(Debug, Args)]
pub struct ListAliases {
    /// List only the aliases of this key (key ID or key ARN).
    #[arg(short = 'k', long, value_name = "KEY_ID")]
    pub key_id: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct TagResource {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// Tags: TagKey=KEY,TagValue=VALUE (repeatable) or a JSON list of {"TagKey","TagValue"}.
    #[arg(long, required = true, num_args = 1.., value_parser = args::tags, value_name = "TAG")]
    pub tags: Vec<TagList>,
}

#[derive(Debug, Args)]
pub struct UntagResource {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The keys of the tags to remove (or a JSON list of them).
    #[arg(long, required = true, num_args = 1.., value_parser = args::tag_keys, value_name = "TAG_KEY")]
    pub tag_keys: Vec<TagKeys>,
}

/// A list command about one key.
#[derive(Debug, Args)]
pub struct KeyPages {
    #[command(flatten)]
    pub key: KeyIdArg,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct PolicyNameArg {
    /// The key policy's name; the only one is default (the default).
    #[arg(long, value_name = "NAME")]
    pub policy_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct PutKeyPolicy {
    #[command(flatten)]
    pub key: KeyIdArg,
    #[command(flatten)]
    pub policy_name: PolicyNameArg,
    /// The key policy document (JSON, or file://PATH).
    #[arg(long, value_parser = args::text, value_name = "POLICY")]
    pub policy: String,
    #[command(flatten)]
    pub bypass: BypassLockoutArg,
}

#[derive(Debug, Args)]
pub struct GetKeyPolicy {
    #[command(flatten)]
    pub key: KeyIdArg,
    #[command(flatten)]
    pub policy_name: PolicyNameArg,
}

#[derive(Debug, Args)]
pub struct CreateGrant {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The principal (ARN) the grant gives permissions to.
    #[arg(long, value_name = "ARN")]
    pub grantee_principal: String,
    /// The principal (ARN) that may retire the grant.
    #[arg(long, value_name = "ARN")]
    pub retiring_principal: Option<String>,
    /// The operations the grant permits, e.g. Encrypt Decrypt (or a JSON list of them).
    #[arg(long, required = true, num_args = 1.., value_parser = args::operations, value_name = "OPERATION")]
    pub operations: Vec<GrantOperations>,
    /// Allow the operations only with this encryption context:
    /// EncryptionContextSubset={KEY=VALUE,...} or EncryptionContextEquals={KEY=VALUE,...},
    /// or JSON such as {"EncryptionContextSubset": {"KEY": "VALUE"}} (or file://PATH).
    #[arg(long, value_parser = args::constraints, value_name = "CONSTRAINTS")]
    pub constraints: Option<GrantConstraints>,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    /// A name for the grant; retrying with the same name and parameters returns the same grant.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct ListGrants {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// List only the grant with this ID.
    #[arg(long, value_name = "GRANT_ID")]
    pub grant_id: Option<String>,
    /// List only the grants given to this principal (ARN).
    #[arg(long, value_name = "ARN")]
    pub grantee_principal: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct ListRetirableGrants {
    /// The retiring principal (ARN) whose grants to list.
    #[arg(long, value_name = "ARN")]
    pub retiring_principal: String,
    #[command(flatten)]
    pub page: PageArgs,
}

/// The grant is named by its token or by its key and ID (the service takes the token when
/// given both).
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("grant").required(true).multiple(true).args(["grant_token", "key_id"])))]
pub struct RetireGrant {
    /// The grant's token, from create-grant (or give --key-id and --grant-id).
    #[arg(long, value_name = "TOKEN")]
    pub grant_token: Option<String>,
    /// The key ARN of the grant's key (with --grant-id).
    #[arg(short = 'k', long, value_name = "KEY_ID", requires = "grant_id")]
    pub key_id: Option<String>,
    /// The grant's ID (with --key-id).
    #[arg(long, value_name = "GRANT_ID", requires = "key_id")]
    pub grant_id: Option<String>,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct RevokeGrant {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The grant's ID.
    #[arg(long, value_name = "GRANT_ID")]
    pub grant_id: String,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct Encrypt {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The plaintext: base64, or fileb://PATH. Without it, raw plaintext is read from stdin
    /// and the raw ciphertext blob is written to stdout.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub plaintext: Option<Blob>,
    /// Encryption context: KEY=VALUE,... or a JSON object (or file://PATH).
    #[arg(long, value_parser = args::context, value_name = "CONTEXT")]
    pub encryption_context: Option<Context>,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    /// The algorithm: SYMMETRIC_DEFAULT (the default), RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256.
    #[arg(long, value_name = "ALGORITHM")]
    pub encryption_algorithm: Option<String>,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct Decrypt {
    /// The ciphertext blob: base64, or fileb://PATH. Without it, the raw blob is read from
    /// stdin and the raw plaintext is written to stdout.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub ciphertext_blob: Option<Blob>,
    /// The encryption context the blob was encrypted with: KEY=VALUE,... or a JSON object.
    #[arg(long, value_parser = args::context, value_name = "CONTEXT")]
    pub encryption_context: Option<Context>,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    /// Require the blob to be under this key.
    #[arg(short = 'k', long, value_name = "KEY_ID")]
    pub key_id: Option<String>,
    /// The algorithm the blob was encrypted with.
    #[arg(long, value_name = "ALGORITHM")]
    pub encryption_algorithm: Option<String>,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct ReEncrypt {
    /// The ciphertext blob: base64, or fileb://PATH. Without it, the raw blob is read from
    /// stdin and the raw new blob is written to stdout.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub ciphertext_blob: Option<Blob>,
    /// The encryption context the blob was encrypted with.
    #[arg(long, value_parser = args::context, value_name = "CONTEXT")]
    pub source_encryption_context: Option<Context>,
    /// Require the blob to be under this key.
    #[arg(long, value_name = "KEY_ID")]
    pub source_key_id: Option<String>,
    /// The key to encrypt under.
    #[arg(short = 'k', long, value_name = "KEY_ID")]
    pub destination_key_id: String,
    /// The encryption context for the new blob.
    #[arg(long, value_parser = args::context, value_name = "CONTEXT")]
    pub destination_encryption_context: Option<Context>,
    /// The algorithm the blob was encrypted with.
    #[arg(long, value_name = "ALGORITHM")]
    pub source_encryption_algorithm: Option<String>,
    /// The algorithm to encrypt with.
    #[arg(long, value_name = "ALGORITHM")]
    pub destination_encryption_algorithm: Option<String>,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct GenerateDataKey {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// Encryption context: KEY=VALUE,... or a JSON object (or file://PATH).
    #[arg(long, value_parser = args::context, value_name = "CONTEXT")]
    pub encryption_context: Option<Context>,
    /// The data key's length in bytes (or give --key-spec).
    #[arg(long, value_name = "N")]
    pub number_of_bytes: Option<u32>,
    /// The data key's type: AES_256 or AES_128.
    #[arg(long, value_name = "KEY_SPEC")]
    pub key_spec: Option<String>,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct GenerateDataKeyPair {
    /// The symmetric KMS key that encrypts the private key.
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The pair's type: RSA_2048, RSA_3072, RSA_4096, ECC_NIST_P256, ECC_NIST_P384,
    /// ECC_NIST_P521, ECC_SECG_P256K1 or ECC_NIST_EDWARDS25519.
    #[arg(long, value_name = "KEY_PAIR_SPEC")]
    pub key_pair_spec: String,
    /// Encryption context of the encrypted private key: KEY=VALUE,... or a JSON object.
    #[arg(long, value_parser = args::context, value_name = "CONTEXT")]
    pub encryption_context: Option<Context>,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct GenerateRandom {
    /// How many random bytes to return.
    #[arg(long, value_name = "N")]
    pub number_of_bytes: Option<u32>,
}

/// What a signed message is: RAW, or a DIGEST already computed with the algorithm's hash.
#[derive(Debug, Args)]
pub struct MessageTypeArg {
    /// RAW (the default; KMS hashes the message) or DIGEST (the message is the hash).
    #[arg(long, value_name = "MESSAGE_TYPE")]
    pub message_type: Option<String>,
}

#[derive(Debug, Args)]
pub struct Sign {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The message, at most 4096 bytes: base64, or fileb://PATH. Without it, the raw message
    /// is read from stdin and the raw signature is written to stdout.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub message: Option<Blob>,
    #[command(flatten)]
    pub message_type: MessageTypeArg,
    /// The algorithm, e.g. ECDSA_SHA_256 or RSASSA_PSS_SHA_256; describe-key lists the key's.
    #[arg(long, value_name = "ALGORITHM")]
    pub signing_algorithm: String,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct Verify {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The message that was signed: base64, or fileb://PATH.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub message: Blob,
    #[command(flatten)]
    pub message_type: MessageTypeArg,
    /// The signature: base64, or fileb://PATH (the raw bytes sign writes in its pipe form).
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub signature: Blob,
    /// The algorithm the message was signed with.
    #[arg(long, value_name = "ALGORITHM")]
    pub signing_algorithm: String,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct GetPublicKey {
    #[command(flatten)]
    pub key: KeyIdArg,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
}

#[derive(Debug, Args)]
pub struct GenerateMac {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The message, at most 4096 bytes: base64, or fileb://PATH. Without it, the raw message
    /// is read from stdin and the raw MAC is written to stdout.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub message: Option<Blob>,
    /// The algorithm: HMAC_SHA_224, HMAC_SHA_256, HMAC_SHA_384 or HMAC_SHA_512, as the key's spec.
    #[arg(long, value_name = "ALGORITHM")]
    pub mac_algorithm: String,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct VerifyMac {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The message the MAC was computed over: base64, or fileb://PATH.
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub message: Blob,
    /// The algorithm the MAC was computed with.
    #[arg(long, value_name = "ALGORITHM")]
    pub mac_algorithm: String,
    /// The MAC: base64, or fileb://PATH (the raw bytes generate-mac writes in its pipe form).
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub mac: Blob,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct ReplicateKey {
    /// The multi-Region primary key (mrk-... key ID or key ARN).
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The region whose agent gets the replica.
    #[arg(long, value_name = "REGION")]
    pub replica_region: String,
    /// The replica's key policy (JSON, or file://PATH); default: the default key policy.
    #[arg(long, value_parser = args::text, value_name = "POLICY")]
    pub policy: Option<String>,
    #[command(flatten)]
    pub bypass: BypassLockoutArg,
    /// The replica's description.
    #[arg(long, value_parser = args::text)]
    pub description: Option<String>,
    /// The replica's tags: TagKey=KEY,TagValue=VALUE (repeatable) or a JSON list.
    #[arg(long, num_args = 1.., value_parser = args::tags, value_name = "TAG")]
    pub tags: Vec<TagList>,
}

#[derive(Debug, Args)]
pub struct UpdatePrimaryRegion {
    /// The multi-Region primary key (mrk-... key ID or key ARN), in this agent's region.
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The region of the replica that becomes the primary key.
    #[arg(long, value_name = "REGION")]
    pub primary_region: String,
}

#[derive(Debug, Args)]
pub struct DeriveSharedSecret {
    #[command(flatten)]
    pub key: KeyIdArg,
    /// The key agreement algorithm; the only one is ECDH.
    #[arg(long, value_name = "ALGORITHM")]
    pub key_agreement_algorithm: String,
    /// The other party's public key, a DER SubjectPublicKeyInfo on the key's curve: base64,
    /// or fileb://PATH (`openssl pkey -pubin -outform DER` converts a PEM one).
    #[arg(long, value_parser = args::blob, value_name = "BLOB")]
    pub public_key: Blob,
    #[command(flatten)]
    pub grant_tokens: GrantTokensArg,
    #[command(flatten)]
    pub dry_run: DryRunArg,
}

#[derive(Debug, Args)]
pub struct CustomKeyStoreIdArg {
    /// The custom key store's ID (cks-...), as create-custom-key-store printed it.
    #[arg(long, value_name = "CUSTOM_KEY_STORE_ID")]
    pub custom_key_store_id: String,
}

/// Where the key store password comes from; there is deliberately no flag that takes the
/// password itself.
#[derive(Debug, Args)]
pub struct KeyStorePasswordArgs {
    /// A file holding the key store password (the token's user PIN, 7 to 32 characters);
    /// one trailing newline is ignored. `-` reads it from stdin.
    #[arg(long, value_name = "FILE")]
    pub key_store_password_file: Option<PathBuf>,
    /// Refused: the aws CLI's flag, whose value every user of the machine can read in the
    /// process list. Declared so that its use gets an explanation, not "unexpected argument".
    #[arg(long, hide = true, value_parser = args::argv_secret, value_name = "PASSWORD")]
    pub key_store_password: Option<ArgvSecret>,
}

#[derive(Debug, Args)]
pub struct CreateCustomKeyStore {
    /// A name for the custom key store, unique among kmsd's custom key stores.
    #[arg(long, value_name = "NAME")]
    pub custom_key_store_name: String,
    /// The CloudHSM cluster ID (cluster-...) under which kmsd's hsm-clusters.json declares
    /// the PKCS#11 token.
    #[arg(long, value_name = "CLUSTER_ID")]
    pub cloud_hsm_cluster_id: String,
    /// The cluster's trust anchor certificate (PEM, or file://PATH), kept with the store.
    #[arg(long, value_parser = args::text, value_name = "CERTIFICATE")]
    pub trust_anchor_certificate: Option<String>,
    /// AWS_CLOUDHSM, the default and the only type kmsd supports.
    #[arg(long, value_name = "TYPE")]
    pub custom_key_store_type: Option<String>,
    // Without --key-store-password-file, the password is read from stdin (after a prompt
    // that does not echo, when stdin is a terminal).
    #[command(flatten)]
    pub password: KeyStorePasswordArgs,
}

#[derive(Debug, Args)]
pub struct DescribeCustomKeyStores {
    /// Show only the custom key store with this ID.
    #[arg(long, value_name = "CUSTOM_KEY_STORE_ID")]
    pub custom_key_store_id: Option<String>,
    /// Show only the custom key store with this name.
    #[arg(long, value_name = "NAME")]
    pub custom_key_store_name: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct UpdateCustomKeyStore {
    #[command(flatten)]
    pub store: CustomKeyStoreIdArg,
    /// The store's new name.
    #[arg(long, value_name = "NAME")]
    pub new_custom_key_store_name: Option<String>,
    // The new password (while the store is DISCONNECTED), only with --key-store-password-file.
    #[command(flatten)]
    pub password: KeyStorePasswordArgs,
    /// Another CloudHSM cluster ID (while the store is DISCONNECTED); its token must hold the
    /// store's keys (a copy of the same token), or they cannot be loaded when it connects.
    #[arg(long, value_name = "CLUSTER_ID")]
    pub cloud_hsm_cluster_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors_are_errors_not_panics() {
        for argv in [
            &["kmsctl", "describe-key"][..],
            &["kmsctl", "encrypt", "-k", "k", "--plaintext", "%%%"],
            &["kmsctl", "list-keys", "--limit", "-1"],
            &["kmsctl", "tag-resource", "-k", "k", "--tags", "TagKey=a"],
            &["kmsctl", "--output", "yaml", "list-keys"],
            &["kmsctl", "put-key-policy", "-k", "k"],
            &["kmsctl", "create-grant", "-k", "k", "--grantee-principal", "arn:p"],
            &[
                "kmsctl",
                "create-grant",
                "-k",
                "k",
                "--grantee-principal",
                "p",
                "--operations",
                "Encrypt",
                "--constraints",
                "a=1",
            ],
            &["kmsctl", "list-retirable-grants"],
            &["kmsctl", "retire-grant"],
            &["kmsctl", "retire-grant", "-k", "k"],
            &["kmsctl", "retire-grant", "--grant-id", "g"],
            &["kmsctl", "revoke-grant", "-k", "k"],
            &["kmsctl", "enable-key-rotation", "-k", "k", "--rotation-period-in-days", "ninety"],
            &["kmsctl", "get-parameters-for-import", "-k", "k", "--wrapping-algorithm", "RSAES_OAEP_SHA_256"],
            &["kmsctl", "get-parameters-for-import", "-k", "k", "--wrapping-key-spec", "RSA_2048"],
            &["kmsctl", "import-key-material", "-k", "k", "--import-token", "AQID"],
            &["kmsctl", "import-key-material", "-k", "k", "--encrypted-key-material", "AQID"],
            &[
                "kmsctl",
                "import-key-material",
                "-k",
                "k",
                "--import-token",
                "AQID",
                "--encrypted-key-material",
                "AQID",
                "--valid-to",
                "next year",
            ],
            &["kmsctl", "import-key-material", "-k", "k", "--import-token", "%%", "--encrypted-key-material", "AQID"],
            &["kmsctl", "delete-imported-key-material"],
            &["kmsctl", "get-key-last-usage"],
            &["kmsctl", "create-custom-key-store", "--custom-key-store-name", "n"],
            &["kmsctl", "create-custom-key-store", "--cloud-hsm-cluster-id", "cluster-abcdefghijk"],
            &["kmsctl", "connect-custom-key-store"],
            &["kmsctl", "disconnect-custom-key-store"],
            &["kmsctl", "delete-custom-key-store"],
            &["kmsctl", "update-custom-key-store", "--new-custom-key-store-name", "n"],
            &["kmsctl", "describe-custom-key-stores", "--limit", "many"],
            &["kmsctl", "sign", "-k", "k", "--message", "AQID"],
            &["kmsctl", "sign", "--message", "AQID", "--signing-algorithm", "ECDSA_SHA_256"],
            &["kmsctl", "sign", "-k", "k", "--message", "%%", "--signing-algorithm", "ECDSA_SHA_256"],
            &["kmsctl", "verify", "-k", "k", "--message", "AQID", "--signing-algorithm", "ECDSA_SHA_256"],
            &["kmsctl", "verify", "-k", "k", "--signature", "AQID", "--signing-algorithm", "ECDSA_SHA_256"],
            &["kmsctl", "verify", "-k", "k", "--message", "AQID", "--signature", "AQID"],
            &["kmsctl", "get-public-key"],
            &["kmsctl", "generate-mac", "-k", "k", "--message", "AQID"],
            &["kmsctl", "verify-mac", "-k", "k", "--message", "AQID", "--mac-algorithm", "HMAC_SHA_256"],
            &["kmsctl", "verify-mac", "-k", "k", "--mac", "AQID", "--mac-algorithm", "HMAC_SHA_256"],
            &[
                "kmsctl",
                "verify-mac",
                "-k",
                "k",
                "--message",
                "AQID",
                "--mac-algorithm",
                "HMAC_SHA_256",
                "--mac",
                "fileb:///nonexistent/mac",
            ],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }
}
