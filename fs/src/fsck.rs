//! `kmsfs fsck`: checks a volume offline — every directory's ID, every name, every file
//! header and every block — and names each damaged file and block. Nothing is repaired.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kmsfs_common::format::block::BlockIndex;
use kmsfs_common::format::header::{self, DataKey, FileHeader, HEADER_SIZE};

use crate::content::{Content, ContentError};
use crate::keys::AgentPool;
use crate::rewrap::Progress;
use crate::volume::{DirId, OpenOptions, Volume};

/// What fsck found.
#[derive(Debug, Default)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub problems: Vec<String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the volume in `cipherdir`, printing each problem as found (and a progress bar
/// when stderr is a terminal).
pub fn run(cipherdir: &Path, socket: Option<&Path>) -> Result<Report, String> {
    // A snapshot's headers are wrapped for its receiver: said as mount says it, not as the
    // first header failing.
    crate::snapshot::refuse_unimported(cipherdir)?;
    let client = kmsfs_common::client::AgentClient::connect_or_start(socket).map_err(|e| e.to_string())?;
    let volume = Volume::open(cipherdir, AgentPool::new(client.socket_path()), OpenOptions::default())?;
    let on = std::io::stderr().is_terminal();
    // The bar's total: the backing files and their bytes, counted first (a walk of metadata
    // only) when there is a bar to show.
    let total = if on { backing_files(volume.root()) } else { (0, 0) };
    let mut checker =
        Checker { volume, report: Report::default(), progress: Progress::new(on), total, checked_bytes: 0 };
    let root = checker.volume.root().to_path_buf();
    let root_id = checker.volume.root_dir_id();
    checker.dir(&root, root_id, Path::new("/"));
    checker.progress.clear();
    Ok(checker.report)
}

/// The regular files under `dir` that are not the format's own, and their bytes.
fn backing_files(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (f, b) = backing_files(&entry.path());
            files += f;
            bytes += b;
        } else if meta.is_file() && !kmsfs_common::format::names::is_reserved_name(&entry.file_name().to_string_lossy())
        {
            files += 1;
            bytes += meta.len();
        }
    }
    (files, bytes)
}

struct Checker {
    volume: Volume,
    report: Report,
    progress: Progress,
    /// Backing files and bytes to check, for the bar.
    total: (u64, u64),
    checked_bytes: u64,
}

impl Checker {
    fn problem(&mut self, message: String) {
        self.progress.suspend(|| println!("{message}"));
        self.report.problems.push(message);
    }

    fn tick(&self) {
        let (files, bytes) = self.total;
        self.progress.show("fsck", self.report.files, files, Some((self.checked_bytes, bytes)));
    }

    fn dir(&mut self, dir: &Path, dir_id: DirId, shown: &Path) {
        self.report.dirs += 1;
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => return self.problem(format!("{}: cannot read directory: {e}", shown.display())),
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let stored = entry.file_name();
            let Some(name) = self.volume.plain_name(dir, &dir_id, &stored) else {
                // The format's own files, and what a write of one killed midway left behind
                // (`.kmsfs.volume.tmp<pid>`, say: the file it replaces is intact).
                let text = stored.to_string_lossy();
                if !kmsfs_common::format::names::is_reserved_name(&text) && !crate::rewrap::is_temporary(&text) {
                    self.problem(format!(
                        "{}: entry {} has a name that does not authenticate",
                        shown.display(),
                        stored.to_string_lossy()
                    ));
                }
                continue;
            };
            let path = entry.path();
            let shown_child: PathBuf = shown.join(OsStr::from_bytes(name.as_bytes()));
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                match self.volume.read_dir_id(&path) {
                    Ok(id) => self.dir(&path, id, &shown_child),
                    Err(e) => self.problem(format!("{}: directory ID: {e}", shown_child.display())),
                }
            } else if meta.is_file() {
                self.file(&path, &shown_child);
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).map_err(crate::volume::VolError::Io);
                if let Err(e) = target.and_then(|t| self.volume.decrypt_symlink(&t)) {
                    self.problem(format!("{}: symlink target: {e}", shown_child.display()));
                }
            }
        }
    }

    fn file(&mut self, path: &Path, shown: &Path) {
        self.report.files += 1;
        if self.total.0 > 0 {
            self.checked_bytes += fs::symlink_metadata(path).map_or(0, |m| m.len());
            self.tick();
        }
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return self.problem(format!("{}: cannot open: {e}", shown.display())),
        };
        let header = match self.volume.open_file(&file) {
            Ok(h) => h,
            Err(e) => return self.problem(format!("{}: header: {e}", shown.display())),
        };
        let keys = match self.volume.keys(&header) {
            Ok(k) => k,
            Err(e) => return self.problem(format!("{}: data key: {e}", shown.display())),
        };
        self.header_slots(&file, &header, &keys.data, shown);
        let content = Content { file: &file, key: &keys.content, file_id: header.file_id() };
        let size = match content.len() {
            Ok(size) => size,
            Err(e) => return self.problem(format!("{}: {e} (cut off a block boundary?)", shown.display())),
        };
        let layout = header.layout();
        let block = layout.block_size();
        for index in 0..layout.block_count(size) {
            match content.read_at(index * block, block as usize) {
                Ok(_) => {}
                Err(ContentError::Corrupt { block, error }) => {
                    self.problem(format!("{}: block {block}: {error}", shown.display()));
                }
                Err(e) => self.problem(format!("{}: block {}: {e}", shown.display(), BlockIndex(index).get())),
            }
        }
    }

    /// Reports a header slot that does not verify as this file's, even though the other
    /// one does: the file reads fine, but it has lost the redundancy that makes header
    /// rewrites crash-safe (FORMAT.md §4), or someone put another file's slot there.
    fn header_slots(&mut self, file: &File, header: &FileHeader, data_key: &DataKey, shown: &Path) {
        let mut bytes = [0u8; HEADER_SIZE];
        if file.read_exact_at(&mut bytes, 0).is_err() {
            return; // open_file read it a moment ago; a vanished file is no damage of ours
        }
        let slots = header::parse_slots(&bytes).unwrap_or_default();
        for index in 0..2 {
            let ok = slots
                .iter()
                .find(|s| s.index() == index)
                .is_some_and(|s| s.file_id() == header.file_id() && s.verify(data_key).is_ok());
            if !ok {
                self.problem(format!("{}: header slot {index} is damaged (the other slot is intact)", shown.display()));
            }
        }
    }
}
