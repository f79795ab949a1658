//! The file header: 1024 bytes at offset 0 of every regular file in the backing directory,
//! two 512-byte slots each holding the whole header, so that rewriting it (a rewrap under
//! another KMS key) is crash-safe and data offsets never move.
//!
//! Slot layout (big-endian integers; `FORMAT.md` is the reference):
//!
//! ```text
//! offset  size  field
//! 0       8     magic "kmsfsHDR"
//! 8       2     format version (1)
//! 10      1     cipher suite (1 = AES-256-GCM, 2 = XChaCha20-Poly1305)
//! 11      1     reserved, 0
//! 12      4     block size
//! 16      8     sequence number; slot i holds only even (i = 0) or odd (i = 1) numbers
//! 24      16    file ID
//! 40      2     wrapped-key length n (1..=438)
//! 42      n     wrapped data key (the agent's ciphertext blob)
//! 42+n    ..    zeros up to offset 480
//! 480     32    HMAC-SHA256 over bytes 0..480, keyed by a subkey of the file's data key
//! ```
//!
//! Reading is two steps because the MAC key comes from the data key, which only the agent
//! can unwrap: [`parse_slots`] checks structure and returns the slots newest first; the
//! filesystem layer unwraps a slot's wrapped key (Decrypt with
//! [`file_key_context`](super::volume::file_key_context)) and calls
//! [`UnverifiedSlot::verify`]. The first slot that verifies is the header:
//!
//! ```text
//! for slot in parse_slots(&bytes)? {
//!     let Ok(data_key) = agent.decrypt(slot.wrapped_key(), file_key_context(vol, &slot.file_id())) else { continue };
//!     if let Ok(header) = slot.verify(&data_key) { return Ok((header, data_key)) }
//! }
//! ```
//!
//! Writing: [`encode_new`] fills both slots (sequence numbers 0 and 1) for a new file;
//! a rewrap encodes [`FileHeader::rewrapped`] with [`FileHeader::encode_slot`] and writes
//! it at [`FileHeader::slot_offset`], which is always the slot *not* holding the header it
//! replaces. A crash mid-write leaves that slot unverifiable and the reader falls back to
//! the other, still intact. The other slot keeps the old wrapping: to retire a KMS key,
//! rewrap twice (both slots), fsyncing in between.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::block::{FileId, Layout};
use super::error::FormatError;
use super::kdf;
use super::volume::{BlockSize, CipherSuite, FORMAT_VERSION};
use crate::aead::{KeyBytes, KEY_LEN};

/// Bytes of one header slot: one disk sector.
pub const SLOT_SIZE: usize = 512;
/// Bytes of the header, where block 0 starts.
pub const HEADER_SIZE: usize = 2 * SLOT_SIZE;
/// The first 8 bytes of each slot.
pub const MAGIC: [u8; 8] = *b"kmsfsHDR";
/// Longest wrapped data key a slot holds (this agent's blobs for a 32-byte key are 93 bytes,
/// AWS KMS's about 184).
pub const MAX_WRAPPED_KEY_LEN: usize = MAC_OFFSET - WRAPPED_OFFSET;
/// Bytes of the slot's MAC.
pub const MAC_LEN: usize = 32;

const VERSION_OFFSET: usize = 8;
const CIPHER_OFFSET: usize = 10;
const RESERVED_OFFSET: usize = 11;
const BLOCK_SIZE_OFFSET: usize = 12;
const SEQ_OFFSET: usize = 16;
const FILE_ID_OFFSET: usize = 24;
const WRAPPED_LEN_OFFSET: usize = 40;
const WRAPPED_OFFSET: usize = 42;
const MAC_OFFSET: usize = SLOT_SIZE - MAC_LEN;

/// A file's 256-bit data key, as GenerateDataKey returns it and Decrypt unwraps it. Every
/// key the file uses is derived from it (header MAC key, content key). Zeroized on drop;
/// its bytes are never printed.
#[derive(Clone)]
pub struct DataKey(KeyBytes);

impl DataKey {
    /// Bytes to ask GenerateDataKey for (`KeySpec: AES_256`).
    pub const LEN: usize = KEY_LEN;

    /// The plaintext of GenerateDataKey or Decrypt; exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<DataKey, FormatError> {
        KeyBytes::from_slice(bytes).map(DataKey).ok_or(FormatError::Malformed { what: "data key length" })
    }

    pub fn from_key_bytes(bytes: KeyBytes) -> DataKey {
        DataKey(bytes)
    }

    /// A fresh key from the OS CSPRNG (tests, and tools that do not use the agent).
    pub fn random() -> DataKey {
        DataKey(KeyBytes::random())
    }

    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose()
    }

    fn header_mac(&self) -> Hmac<Sha256> {
        let key = kdf::derive::<32>(self.expose(), kdf::LABEL_HEADER_MAC);
        // HMAC takes keys of any length.
        #[allow(clippy::expect_used)]
        <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_ref()).expect("HMAC accepts a 32-byte key")
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A verified file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    file_id: FileId,
    cipher: CipherSuite,
    block_size: BlockSize,
    wrapped_key: Vec<u8>,
    seq: u64,
}

impl FileHeader {
    /// The header of a new file, as a reader sees it after [`encode_new`] (sequence 1).
    /// `wrapped_key` is GenerateDataKey's CiphertextBlob, made under
    /// `file_key_context(volume, file_id)`.
    pub fn new(file_id: FileId, layout: Layout, wrapped_key: Vec<u8>) -> Result<FileHeader, FormatError> {
        check_wrapped_len(wrapped_key.len())?;
        Ok(FileHeader { file_id, cipher: layout.cipher, block_size: layout.block_size, wrapped_key, seq: 1 })
    }

    /// The same header with the data key wrapped anew (rewrap: the data key, and so the
    /// blocks, stay the same) and the next sequence number.
    pub fn rewrapped(&self, wrapped_key: Vec<u8>) -> Result<FileHeader, FormatError> {
        check_wrapped_len(wrapped_key.len())?;
        let seq = self.seq.checked_add(1).ok_or(FormatError::Malformed { what: "header sequence number" })?;
        Ok(FileHeader { wrapped_key, seq, ..self.clone() })
    }

    pub fn file_id(&self) -> FileId {
        self.file_id
    }

    pub fn cipher(&self) -> CipherSuite {
        self.cipher
    }

    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    pub fn layout(&self) -> Layout {
        Layout::new(self.cipher, self.block_size)
    }

    pub fn wrapped_key(&self) -> &[u8] {
        &self.wrapped_key
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Which slot this header lives in: `seq mod 2`.
    pub fn slot_index(&self) -> usize {
        (self.seq % 2) as usize
    }

    /// Offset in the backing file where [`encode_slot`](Self::encode_slot)'s bytes go.
    pub fn slot_offset(&self) -> u64 {
        (self.slot_index() * SLOT_SIZE) as u64
    }

    /// The slot's bytes, authenticated under `data_key` (the key `wrapped_key` wraps).
    pub fn encode_slot(&self, data_key: &DataKey) -> [u8; SLOT_SIZE] {
        encode_with_seq(self, self.seq, data_key)
    }
}

fn check_wrapped_len(len: usize) -> Result<(), FormatError> {
    if len == 0 {
        return Err(FormatError::Malformed { what: "wrapped key (empty)" });
    }
    if len > MAX_WRAPPED_KEY_LEN {
        return Err(FormatError::TooLong { what: "wrapped key", len, max: MAX_WRAPPED_KEY_LEN });
    }
    Ok(())
}

fn encode_with_seq(header: &FileHeader, seq: u64, data_key: &DataKey) -> [u8; SLOT_SIZE] {
    let mut slot = [0u8; SLOT_SIZE];
    slot[..VERSION_OFFSET].copy_from_slice(&MAGIC);
    slot[VERSION_OFFSET..CIPHER_OFFSET].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    slot[CIPHER_OFFSET] = header.cipher.code();
    slot[RESERVED_OFFSET] = 0;
    slot[BLOCK_SIZE_OFFSET..SEQ_OFFSET].copy_from_slice(&header.block_size.get().to_be_bytes());
    slot[SEQ_OFFSET..FILE_ID_OFFSET].copy_from_slice(&seq.to_be_bytes());
    slot[FILE_ID_OFFSET..WRAPPED_LEN_OFFSET].copy_from_slice(header.file_id.as_bytes());
    // The length was checked when the header was built: at most 438, fits a u16.
    let len = header.wrapped_key.len();
    slot[WRAPPED_LEN_OFFSET..WRAPPED_OFFSET].copy_from_slice(&(len as u16).to_be_bytes());
    slot[WRAPPED_OFFSET..WRAPPED_OFFSET + len].copy_from_slice(&header.wrapped_key);
    let mut mac = data_key.header_mac();
    mac.update(&slot[..MAC_OFFSET]);
    slot[MAC_OFFSET..].copy_from_slice(&mac.finalize().into_bytes());
    slot
}

/// Both slots of a new file's header: the same header with sequence numbers 0 (slot 0) and
/// 1 (slot 1), so that either sector alone can be lost from the start. Any `seq` in
/// `header` is ignored; reading back gives sequence 1.
pub fn encode_new(header: &FileHeader, data_key: &DataKey) -> [u8; HEADER_SIZE] {
    let mut out = [0u8; HEADER_SIZE];
    out[..SLOT_SIZE].copy_from_slice(&encode_with_seq(header, 0, data_key));
    out[SLOT_SIZE..].copy_from_slice(&encode_with_seq(header, 1, data_key));
    out
}

/// A slot whose structure is valid but whose MAC has not been checked: its fields are
/// attacker-controlled until [`verify`](Self::verify) succeeds. They are exposed only to
/// find the data key (the wrapped key, and the file ID for the encryption context).
#[derive(Debug, Clone)]
pub struct UnverifiedSlot {
    index: usize,
    header: FileHeader,
    bytes: [u8; SLOT_SIZE],
}

impl UnverifiedSlot {
    /// 0 or 1: where the slot lies.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn file_id(&self) -> FileId {
        self.header.file_id
    }

    pub fn seq(&self) -> u64 {
        self.header.seq
    }

    pub fn wrapped_key(&self) -> &[u8] {
        &self.header.wrapped_key
    }

    /// Checks the slot's MAC under `data_key`; the header is trustworthy only after this.
    pub fn verify(&self, data_key: &DataKey) -> Result<FileHeader, FormatError> {
        let mut mac = data_key.header_mac();
        mac.update(&self.bytes[..MAC_OFFSET]);
        mac.verify_slice(&self.bytes[MAC_OFFSET..]).map_err(|_| FormatError::Authentication { what: "header slot" })?;
        Ok(self.header.clone())
    }
}

fn parse_slot(index: usize, bytes: &[u8; SLOT_SIZE]) -> Result<UnverifiedSlot, FormatError> {
    let malformed = |what| FormatError::Malformed { what };
    if bytes[..VERSION_OFFSET] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u16::from_be_bytes([bytes[VERSION_OFFSET], bytes[VERSION_OFFSET + 1]]);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let cipher = CipherSuite::from_code(bytes[CIPHER_OFFSET])?;
    if bytes[RESERVED_OFFSET] != 0 {
        return Err(malformed("header slot (reserved byte)"));
    }
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[BLOCK_SIZE_OFFSET..SEQ_OFFSET]);
    let block_size = BlockSize::new(u64::from(u32::from_be_bytes(word)))?;
    let mut long = [0u8; 8];
    long.copy_from_slice(&bytes[SEQ_OFFSET..FILE_ID_OFFSET]);
    let seq = u64::from_be_bytes(long);
    if (seq % 2) as usize != index {
        return Err(malformed("header slot (sequence number in the wrong slot)"));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[FILE_ID_OFFSET..WRAPPED_LEN_OFFSET]);
    let len = usize::from(u16::from_be_bytes([bytes[WRAPPED_LEN_OFFSET], bytes[WRAPPED_LEN_OFFSET + 1]]));
    if len == 0 || len > MAX_WRAPPED_KEY_LEN {
        return Err(malformed("header slot (wrapped key length)"));
    }
    let end = WRAPPED_OFFSET + len;
    if bytes[end..MAC_OFFSET].iter().any(|&b| b != 0) {
        return Err(malformed("header slot (padding)"));
    }
    let header = FileHeader {
        file_id: FileId::from_bytes(id),
        cipher,
        block_size,
        wrapped_key: bytes[WRAPPED_OFFSET..end].to_vec(),
        seq,
    };
    Ok(UnverifiedSlot { index, header, bytes: *bytes })
}

/// The structurally valid slots of a header, newest (highest sequence number) first. Fails
/// only when neither slot is valid, with slot 0's error. The caller still has to
/// [`verify`](UnverifiedSlot::verify) one.
pub fn parse_slots(bytes: &[u8; HEADER_SIZE]) -> Result<Vec<UnverifiedSlot>, FormatError> {
    let mut slots = Vec::with_capacity(2);
    let mut first_error = None;
    for (index, chunk) in bytes.chunks_exact(SLOT_SIZE).enumerate() {
        let mut slot = [0u8; SLOT_SIZE];
        slot.copy_from_slice(chunk);
        match parse_slot(index, &slot) {
            Ok(s) => slots.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if slots.is_empty() {
        return Err(first_error.unwrap_or(FormatError::Truncated { what: "header" }));
    }
    slots.sort_by_key(|slot| std::cmp::Reverse(slot.seq()));
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn setup() -> (FileHeader, DataKey, [u8; HEADER_SIZE]) {
        let key = DataKey::random();
        let layout = Layout::new(CipherSuite::XChaCha20Poly1305, BlockSize::new(65536).unwrap());
        let header = FileHeader::new(FileId::random(), layout, vec![0xb1; 93]).unwrap();
        let bytes = encode_new(&header, &key);
        (header, key, bytes)
    }

    /// What a reader does: newest verifiable slot.
    fn read(bytes: &[u8; HEADER_SIZE], key: &DataKey) -> Result<FileHeader, FormatError> {
        let slots = parse_slots(bytes)?;
        let mut last = FormatError::Authentication { what: "header slot" };
        for slot in slots {
            match slot.verify(key) {
                Ok(h) => return Ok(h),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    #[test]
    fn round_trip_and_both_slots_hold_the_header() {
        let (header, key, bytes) = setup();
        assert_eq!(read(&bytes, &key).unwrap(), header);
        let slots = parse_slots(&bytes).unwrap();
        assert_eq!(slots.iter().map(|s| (s.index(), s.seq())).collect::<Vec<_>>(), vec![(1, 1), (0, 0)]);
        for slot in &slots {
            assert_eq!(slot.file_id(), header.file_id());
            assert_eq!(slot.wrapped_key(), header.wrapped_key());
            let h = slot.verify(&key).unwrap();
            assert_eq!(h.layout(), header.layout());
        }
        assert_eq!(&bytes[..8], b"kmsfsHDR");
        assert_eq!(&bytes[512..520], b"kmsfsHDR");
        assert_eq!(bytes[CIPHER_OFFSET], 2);
        assert_eq!(&bytes[BLOCK_SIZE_OFFSET..SEQ_OFFSET], &65536u32.to_be_bytes());
    }

    #[test]
    fn wrong_data_key_fails_both_slots() {
        let (_, _, bytes) = setup();
        assert_eq!(read(&bytes, &DataKey::random()), Err(FormatError::Authentication { what: "header slot" }));
    }

    /// Each field of a slot, tampered: that slot fails (structurally or by MAC), the
    /// other slot still gives the header; with both slots tampered, reading fails.
    #[test]
    fn tampering_any_field_of_a_slot_falls_back_to_the_other() {
        let (header, key, bytes) = setup();
        let fields: [(&str, usize); 10] = [
            ("magic", 3),
            ("version", VERSION_OFFSET + 1),
            ("cipher", CIPHER_OFFSET),
            ("reserved", RESERVED_OFFSET),
            ("block size", BLOCK_SIZE_OFFSET + 1),
            ("seq", SEQ_OFFSET + 3),
            ("file id", FILE_ID_OFFSET + 9),
            ("wrapped key", WRAPPED_OFFSET + 50),
            ("padding", 300),
            ("mac", MAC_OFFSET + 31),
        ];
        for (name, at) in fields {
            for bit in [0u8, 1, 6] {
                for slot in [0usize, 1] {
                    let mut t = bytes;
                    t[slot * SLOT_SIZE + at] ^= 1 << bit;
                    let own: [u8; SLOT_SIZE] = t[slot * SLOT_SIZE..][..SLOT_SIZE].try_into().unwrap();
                    let verdict = parse_slot(slot, &own).and_then(|s| s.verify(&key));
                    assert!(verdict.is_err(), "{name} bit {bit} in slot {slot} went unnoticed");
                    let h = read(&t, &key).unwrap_or_else(|e| panic!("{name} in slot {slot}: {e}"));
                    assert_eq!(h.wrapped_key(), header.wrapped_key());
                    assert_eq!(h.seq(), 1 - slot as u64, "{name}: the other slot answers");
                }
                let mut both = bytes;
                both[at] ^= 1 << bit;
                both[SLOT_SIZE + at] ^= 1 << bit;
                assert!(read(&both, &key).is_err(), "{name} bit {bit} in both slots");
            }
        }
        // Whole-field replacements that keep the structure valid fail the MAC.
        let mut t = bytes;
        t[SLOT_SIZE + WRAPPED_LEN_OFFSET + 1] = 92;
        t[SLOT_SIZE + WRAPPED_OFFSET + 92] = 0;
        assert_eq!(parse_slots(&t).unwrap()[0].seq(), 1);
        assert_eq!(read(&t, &key).unwrap().seq(), 0);
    }

    #[test]
    fn structural_errors_name_the_problem() {
        let (_, _, bytes) = setup();
        let slot = |edit: &dyn Fn(&mut [u8; SLOT_SIZE])| {
            let mut s: [u8; SLOT_SIZE] = bytes[..SLOT_SIZE].try_into().unwrap();
            edit(&mut s);
            parse_slot(0, &s).map(|_| ())
        };
        assert_eq!(slot(&|s| s[0] = b'K'), Err(FormatError::BadMagic));
        assert_eq!(slot(&|s| s[VERSION_OFFSET + 1] = 2), Err(FormatError::UnsupportedVersion(2)));
        assert_eq!(slot(&|s| s[CIPHER_OFFSET] = 9), Err(FormatError::UnknownCipher(9)));
        assert_eq!(slot(&|s| s[BLOCK_SIZE_OFFSET + 3] = 1), Err(FormatError::InvalidBlockSize(65537)));
        assert!(matches!(slot(&|s| s[SEQ_OFFSET + 7] = 1), Err(FormatError::Malformed { .. })));
        assert!(matches!(slot(&|s| s[WRAPPED_LEN_OFFSET + 1] = 0), Err(FormatError::Malformed { .. })));
        assert!(matches!(slot(&|s| s[WRAPPED_LEN_OFFSET] = 2), Err(FormatError::Malformed { .. })));
        assert!(matches!(slot(&|s| s[479] = 1), Err(FormatError::Malformed { .. })));
        assert_eq!(parse_slots(&[0u8; HEADER_SIZE]).unwrap_err(), FormatError::BadMagic);
    }

    #[test]
    fn rewrap_writes_the_older_slot_and_the_newest_valid_slot_wins() {
        let (header, key, mut bytes) = setup();
        // Rewrap twice: seq 2 goes to slot 0, seq 3 to slot 1.
        let second = header.rewrapped(vec![0xb2; 184]).unwrap();
        assert_eq!((second.seq(), second.slot_offset()), (2, 0));
        bytes[..SLOT_SIZE].copy_from_slice(&second.encode_slot(&key));
        assert_eq!(read(&bytes, &key).unwrap(), second);
        let third = second.rewrapped(vec![0xb3; MAX_WRAPPED_KEY_LEN]).unwrap();
        assert_eq!((third.seq(), third.slot_offset()), (3, SLOT_SIZE as u64));
        let before_third = bytes;
        bytes[SLOT_SIZE..].copy_from_slice(&third.encode_slot(&key));
        assert_eq!(read(&bytes, &key).unwrap(), third);
        // A torn write of the third header (half the sector new) falls back to the second.
        let mut torn = before_third;
        torn[SLOT_SIZE..SLOT_SIZE + 256].copy_from_slice(&bytes[SLOT_SIZE..SLOT_SIZE + 256]);
        assert_eq!(read(&torn, &key).unwrap(), second);
        // A zeroed sector likewise.
        let mut zeroed = bytes;
        zeroed[SLOT_SIZE..].fill(0);
        assert_eq!(read(&zeroed, &key).unwrap(), second);
        // A slot copied into the other position is refused (sequence parity).
        let mut copied = bytes;
        copied.copy_within(SLOT_SIZE.., 0);
        assert_eq!(parse_slots(&copied).unwrap().len(), 1);
    }

    #[test]
    fn wrapped_key_length_limits() {
        let layout = Layout::new(CipherSuite::Aes256Gcm, BlockSize::DEFAULT);
        assert!(FileHeader::new(FileId::random(), layout, vec![]).is_err());
        assert_eq!(
            FileHeader::new(FileId::random(), layout, vec![1; MAX_WRAPPED_KEY_LEN + 1]),
            Err(FormatError::TooLong { what: "wrapped key", len: 439, max: 438 })
        );
        let key = DataKey::random();
        let h = FileHeader::new(FileId::random(), layout, vec![1; MAX_WRAPPED_KEY_LEN]).unwrap();
        assert_eq!(read(&encode_new(&h, &key), &key).unwrap(), h);
        let h = FileHeader::new(FileId::random(), layout, vec![1]).unwrap();
        assert_eq!(read(&encode_new(&h, &key), &key).unwrap(), h);
    }

    #[test]
    fn data_key_length_and_redaction() {
        assert!(DataKey::from_bytes(&[1; 31]).is_err());
        assert!(DataKey::from_bytes(&[1; 33]).is_err());
        assert!(DataKey::from_bytes(&[1; 32]).is_ok());
        assert_eq!(format!("{:?}", DataKey::from_bytes(&[1; 32]).unwrap()), "DataKey(<redacted>)");
    }

    #[test]
    fn random_bytes_never_panic_the_header_parser() {
        let mut rng = Rng(3);
        let (_, key, valid) = setup();
        for _ in 0..3000 {
            let mut bytes = valid;
            for _ in 0..1 + rng.index(6) {
                let at = rng.index(HEADER_SIZE);
                bytes[at] = rng.next_u64() as u8;
            }
            if let Ok(slots) = parse_slots(&bytes) {
                for s in slots {
                    let _ = s.verify(&key);
                }
            }
            let mut random = [0u8; HEADER_SIZE];
            random.copy_from_slice(&rng.bytes(HEADER_SIZE));
            random[..8].copy_from_slice(&MAGIC);
            random[SLOT_SIZE..SLOT_SIZE + 8].copy_from_slice(&MAGIC);
            if let Ok(slots) = parse_slots(&random) {
                for s in slots {
                    assert!(s.verify(&key).is_err());
                }
            }
        }
    }
}
