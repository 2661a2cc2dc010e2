//! A zip archive is hostile until proven otherwise. [`Package::open`] checks the whole central
//! directory against the limits and path rules before a single byte of content is trusted, and
//! every read of an entry is bounded by the size the directory declared.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use fleetcast_events::manifest::FileEntry;
use fleetcast_events::tree::{ChunkList, TreeFile};
use fleetcast_events::v1::ChunkRef;
use fleetcast_events::v1::{RejectCode, Rejection};
use serde::Deserialize;
use zip::ZipArchive;

use crate::chunking::{self, ChunkId};
use crate::package_config::{self, PackageConfig, PackageConfigError};

/// Limits against zip bombs, from each service's config (`limits.*`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveLimits {
    pub max_entries: usize,
    /// Sum of the uncompressed sizes of all entries.
    pub max_total_bytes: u64,
    /// Uncompressed / compressed, per entry (for entries of at least 1 MiB) and for the archive.
    pub max_ratio: u64,
    /// Refuse names that differ only in case (`README`, `readme`): they install on Linux but
    /// not on a case-insensitive filesystem. Off, they are allowed and logged.
    pub refuse_case_clashes: bool,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            // A release's metadata is a tree of small nodes (fleetcast_events::tree), so no
            // message limit bounds the file count: 200,000 files go through (ops/bench agent,
            // many_files_*); 10 GiB needs the store quotas raised (nats.quotas).
            max_entries: 250_000,
            max_total_bytes: 16 << 30,
            max_ratio: 200,
            refuse_case_clashes: false,
        }
    }
}

impl ArchiveLimits {
    /// The largest archive file these limits can accept: its contents stored uncompressed, plus
    /// generous room for each entry's headers and name (a local header and a central-directory
    /// record, each with the name). Larger ones are refused before they are downloaded.
    pub fn max_archive_bytes(&self) -> u64 {
        const PER_ENTRY: u64 = 4096;
        self.max_total_bytes
            .saturating_add((self.max_entries as u64).saturating_mul(PER_ENTRY))
            .saturating_add(PER_ENTRY)
    }
}

/// Below this size a high ratio is harmless (a small file of zeros) and not checked per entry.
const RATIO_FLOOR: u64 = 1 << 20;
/// A symlink's target is read into memory; real ones are short.
const MAX_LINK_TARGET: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a readable zip archive: {0}")]
    Corrupt(String),
    #[error("entry {0:?} escapes the package with '..'")]
    PathTraversal(String),
    #[error("entry {0:?} has an absolute path")]
    AbsolutePath(String),
    #[error("entry {path:?} has an invalid path: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("symbolic link {path:?} points outside the package (to {target:?})")]
    LinkOutside { path: String, target: String },
    /// A link that resolves outside the package, component by component (see [`crate::links`]).
    #[error("symbolic link {0}")]
    Link(#[from] crate::links::LinkError),
    #[error("entry {0:?} appears more than once")]
    Duplicate(String),
    #[error("archive has {count} entries, the limit is {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("archive unpacks to {total} bytes, the limit is {limit}")]
    TooLarge { total: u64, limit: u64 },
    #[error("{what} has compression ratio {ratio}:1, the limit is {limit}:1")]
    Ratio {
        what: String,
        ratio: u64,
        limit: u64,
    },
    #[error(transparent)]
    PackageConfig(#[from] PackageConfigError),
    /// No host could install it (see [`crate::installable`]).
    #[error("no host can install it: {0}")]
    Uninstallable(#[from] crate::installable::Uninstallable),
    #[error("cannot read the archive: {0}")]
    Io(#[from] io::Error),
}

impl ArchiveError {
    pub fn code(&self) -> RejectCode {
        match self {
            ArchiveError::Corrupt(_) | ArchiveError::Io(_) | ArchiveError::InvalidPath { .. } => {
                RejectCode::CorruptArchive
            }
            ArchiveError::PathTraversal(_) => RejectCode::PathTraversal,
            ArchiveError::AbsolutePath(_) => RejectCode::AbsolutePath,
            ArchiveError::LinkOutside { .. } | ArchiveError::Link(_) => {
                RejectCode::LinkOutsidePackage
            }
            ArchiveError::Duplicate(_) => RejectCode::DuplicateEntry,
            ArchiveError::TooManyEntries { .. } => RejectCode::TooManyEntries,
            ArchiveError::TooLarge { .. } => RejectCode::TooLarge,
            ArchiveError::Ratio { .. } => RejectCode::CompressionRatio,
            ArchiveError::PackageConfig(_) => RejectCode::InvalidPackageConfig,
            ArchiveError::Uninstallable(u) => {
                use crate::installable::Uninstallable as U;
                match u {
                    U::NameTooLong { .. } | U::PathTooLong { .. } => RejectCode::NameTooLong,
                    U::FileAndFolder { .. } | U::CaseClash { .. } => RejectCode::PathConflict,
                    U::Empty => RejectCode::EmptyPackage,
                }
            }
        }
    }

    pub fn rejection(&self) -> Rejection {
        Rejection {
            code: self.code(),
            message: self.to_string(),
        }
    }
}

impl From<zip::result::ZipError> for ArchiveError {
    fn from(e: zip::result::ZipError) -> Self {
        ArchiveError::Corrupt(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File { mode: u32 },
    Dir,
    Symlink { target: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index in the zip's central directory.
    pub index: usize,
    /// Normalised relative path (no trailing '/').
    pub path: String,
    pub kind: EntryKind,
    /// Uncompressed size the directory declares; reads are held to it.
    pub size: u64,
}

/// An archive whose directory passed every check.
pub struct Package {
    zip: ZipArchive<SharedFile>,
    entries: std::sync::Arc<[Entry]>,
    warnings: crate::installable::Warnings,
}

/// The archive file, read at a position of each reader's own: readers cloned from one
/// [`Package`] share the open file and the parsed central directory (for 200,000 entries, tens
/// of MiB parsed once, not once per thread).
#[derive(Clone)]
struct SharedFile {
    file: std::sync::Arc<File>,
    pos: u64,
    len: u64,
}

impl Read for SharedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for SharedFile {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let (base, delta) = match to {
            io::SeekFrom::Start(n) => (n, 0),
            io::SeekFrom::End(d) => (self.len, d),
            io::SeekFrom::Current(d) => (self.pos, d),
        };
        self.pos = base
            .checked_add_signed(delta)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

impl Package {
    pub fn open(path: &Path, limits: &ArchiveLimits) -> Result<Package, ArchiveError> {
        let file = File::open(path)?;
        let archive_len = file.metadata()?.len();
        let mut zip = ZipArchive::new(SharedFile {
            file: std::sync::Arc::new(file),
            pos: 0,
            len: archive_len,
        })?;
        if zip.len() > limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                count: zip.len(),
                limit: limits.max_entries,
            });
        }
        if zip.has_duplicate_names() {
            // The zip crate keeps one entry per name, so the repeated name itself is not recoverable.
            return Err(ArchiveError::Duplicate(
                "a name in the central directory".into(),
            ));
        }
        let mut entries = Vec::with_capacity(zip.len());
        let mut tally = Tally::default();
        for index in 0..zip.len() {
            let (mut entry, compressed) = directory_record(&mut zip, index)?;
            tally.admit(&entry, compressed, limits)?;
            // A link's target is content: read only once its record passed the limits.
            if let EntryKind::Symlink { target } = &mut entry.kind {
                *target = read_link_target(&mut zip, index, &entry.path)?;
            }
            entries.push(entry);
        }
        check_ratio(|| "the archive".into(), tally.total, archive_len, limits)?;

        check_links(&entries)?;
        let warnings = crate::installable::check(
            entries
                .iter()
                .map(|e| (e.path.as_str(), e.kind == EntryKind::Dir)),
            limits.refuse_case_clashes,
        )?;
        Ok(Package {
            zip,
            entries: entries.into(),
            warnings,
        })
    }

    /// Another reader of the same archive, for another thread: the same file, entries and
    /// central directory, its own position.
    pub fn reader(&self) -> Package {
        Package {
            zip: self.zip.clone(),
            entries: self.entries.clone(),
            warnings: self.warnings.clone(),
        }
    }

    /// What installs but deserves a warning (names that differ only in case).
    pub fn warnings(&self) -> &crate::installable::Warnings {
        &self.warnings
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Regular files, in archive order.
    pub fn files(&self) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File { .. }))
    }

    /// Reads one entry's content, failing if it yields more or fewer bytes than declared or its
    /// CRC is wrong (the zip crate checks the CRC at the end of the entry).
    pub fn read_entry(
        &mut self,
        index: usize,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<u64, ArchiveError> {
        let mut f = self.zip.by_index(index)?;
        let declared = f.size();
        let name = f.name().map(|n| n.into_owned()).unwrap_or_default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut read: u64 = 0;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| ArchiveError::Corrupt(format!("entry {name:?}: {e}")))?;
            if n == 0 {
                break;
            }
            read += n as u64;
            if read > declared {
                return Err(ArchiveError::Corrupt(format!(
                    "entry {name:?} holds more than its declared {declared} bytes"
                )));
            }
            sink(&buf[..n])?;
        }
        if read != declared {
            return Err(ArchiveError::Corrupt(format!(
                "entry {name:?} holds {read} bytes, {declared} declared"
            )));
        }
        Ok(read)
    }

    /// The package's own `fleetcast.toml`, parsed and checked; `None` when it has none.
    pub fn config(&mut self) -> Result<Option<PackageConfig>, ArchiveError> {
        let Some(entry) = self
            .entries
            .iter()
            .find(|e| e.path == package_config::FILE_NAME)
            .cloned()
        else {
            return Ok(None);
        };
        if !matches!(entry.kind, EntryKind::File { .. }) {
            return Err(PackageConfigError::NotAFile.into());
        }
        if entry.size > package_config::MAX_SIZE {
            return Err(PackageConfigError::TooLarge { size: entry.size }.into());
        }
        let mut text = Vec::new();
        self.read_entry(entry.index, |b| {
            text.extend_from_slice(b);
            Ok(())
        })?;
        let text = String::from_utf8(text).map_err(|_| PackageConfigError::NotUtf8)?;
        Ok(Some(PackageConfig::parse(&text)?))
    }

    /// A reader over one entry, for streaming consumers (chunking). It fails on more bytes than
    /// declared; the zip crate fails it on a CRC mismatch at the end.
    pub fn entry_reader(&mut self, index: usize) -> Result<impl Read + '_, ArchiveError> {
        let f = self.zip.by_index(index)?;
        let declared = f.size();
        Ok(BoundedReader {
            inner: f,
            left: declared,
        })
    }

    /// Every file's path, mode, size, BLAKE3 and chunk list, read from the archive itself, in
    /// path order: the tree the signer signs (`fleetcast_events::tree`).
    pub fn file_tree(&mut self) -> Result<Vec<TreeFile>, ArchiveError> {
        let entries = self.entries.clone();
        let mut out = Vec::new();
        for entry in entries.iter() {
            match &entry.kind {
                EntryKind::Dir => {}
                EntryKind::Symlink { target } => {
                    out.push(TreeFile::link(entry.path.clone(), target.clone()))
                }
                EntryKind::File { mode } => {
                    let (entry, chunks) = self.chunk_entry(entry, *mode, |_, _| Ok(()))?;
                    out.push(TreeFile {
                        entry,
                        chunks: ChunkList::Listed(chunks),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
        Ok(out)
    }

    /// Cuts one file entry into chunks (handing each to `sink`), hashing the whole file as it
    /// goes: its manifest entry and chunk list.
    pub fn chunk_entry(
        &mut self,
        entry: &Entry,
        mode: u32,
        mut sink: impl FnMut(ChunkId, Vec<u8>) -> Result<(), ArchiveError>,
    ) -> Result<(FileEntry, Vec<ChunkRef>), ArchiveError> {
        let mut hasher = blake3::Hasher::new();
        let (mut size, mut chunks) = (0u64, Vec::new());
        let reader = self.entry_reader(entry.index)?;
        for chunk in chunking::chunks(reader) {
            let (id, data) =
                chunk.map_err(|e| ArchiveError::Corrupt(format!("entry {:?}: {e}", entry.path)))?;
            hasher.update(&data);
            size += data.len() as u64;
            chunks.push(chunking::chunk_ref(&id, data.len()));
            sink(id, data)?;
        }
        let file = FileEntry {
            path: entry.path.clone(),
            mode,
            size,
            blake3: hasher.finalize().to_hex().to_string(),
            link: None,
        };
        Ok((file, chunks))
    }
}

struct BoundedReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for BoundedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "entry holds more than its declared size",
            ));
        }
        self.left -= n as u64;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "entry is shorter than its declared size",
            ));
        }
        Ok(n)
    }
}

/// What the central directory says of entry `index` (its path checked; a link's target left
/// empty), and its compressed size.
fn directory_record(
    zip: &mut ZipArchive<SharedFile>,
    index: usize,
) -> Result<(Entry, u64), ArchiveError> {
    let f = zip.by_index_raw(index)?;
    let raw_name = String::from_utf8(f.name_raw().to_vec())
        .map_err(|_| ArchiveError::Corrupt(format!("entry {index} has a non-UTF-8 name")))?;
    let path = check_entry_path(&raw_name)?;
    let kind = if f.is_symlink() {
        EntryKind::Symlink {
            target: String::new(),
        }
    } else if f.is_dir() || raw_name.ends_with('/') {
        EntryKind::Dir
    } else {
        // Permission bits only: setuid/setgid/sticky from an archive are never honoured.
        EntryKind::File {
            mode: f.unix_mode().map_or(0o644, |m| m & 0o777),
        }
    };
    let entry = Entry {
        index,
        path,
        kind,
        size: f.size(),
    };
    Ok((entry, f.compressed_size()))
}

/// The entries admitted so far: their paths, each once, and the sum of their sizes.
#[derive(Default)]
struct Tally {
    seen: HashSet<String>,
    total: u64,
}

impl Tally {
    /// Admits one more entry: a path not seen before, the sum of sizes within the limit, and
    /// a compression ratio within it.
    fn admit(
        &mut self,
        entry: &Entry,
        compressed: u64,
        limits: &ArchiveLimits,
    ) -> Result<(), ArchiveError> {
        if !self.seen.insert(entry.path.clone()) {
            return Err(ArchiveError::Duplicate(entry.path.clone()));
        }
        self.total = self.total.saturating_add(entry.size);
        if self.total > limits.max_total_bytes {
            return Err(ArchiveError::TooLarge {
                total: self.total,
                limit: limits.max_total_bytes,
            });
        }
        check_ratio(
            || format!("entry {:?}", entry.path),
            entry.size,
            compressed,
            limits,
        )
    }
}

/// Refuses `size` bytes stored in `compressed` beyond the limit's ratio; below [`RATIO_FLOOR`]
/// any ratio passes. `what`: the entry or the archive, named only when refused.
fn check_ratio(
    what: impl FnOnce() -> String,
    size: u64,
    compressed: u64,
    limits: &ArchiveLimits,
) -> Result<(), ArchiveError> {
    let ratio = size / compressed.max(1);
    if size >= RATIO_FLOOR && ratio > limits.max_ratio {
        return Err(ArchiveError::Ratio {
            what: what(),
            ratio,
            limit: limits.max_ratio,
        });
    }
    Ok(())
}

/// Classifies a raw entry name: absolute, traversal, otherwise-invalid, or a clean relative path.
fn check_entry_path(raw: &str) -> Result<String, ArchiveError> {
    let bytes = raw.as_bytes();
    let drive = bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic();
    if raw.starts_with('/') || raw.starts_with('\\') || drive {
        return Err(ArchiveError::AbsolutePath(raw.to_string()));
    }
    if raw.split(['/', '\\']).any(|part| part == "..") {
        return Err(ArchiveError::PathTraversal(raw.to_string()));
    }
    let path = raw.strip_suffix('/').unwrap_or(raw);
    fleetcast_events::manifest::check_relative_path(path).map_err(|e| {
        ArchiveError::InvalidPath {
            path: raw.to_string(),
            reason: e.why.to_string(),
        }
    })?;
    Ok(path.to_string())
}

fn read_link_target(
    zip: &mut ZipArchive<SharedFile>,
    index: usize,
    path: &str,
) -> Result<String, ArchiveError> {
    let f = zip.by_index(index)?;
    if f.size() > MAX_LINK_TARGET {
        return Err(ArchiveError::LinkOutside {
            path: path.into(),
            target: format!("<{} bytes>", f.size()),
        });
    }
    let mut target = String::new();
    f.take(MAX_LINK_TARGET)
        .read_to_string(&mut target)
        .map_err(|e| ArchiveError::Corrupt(format!("symbolic link {path:?}: {e}")))?;
    Ok(target)
}

/// Every link must resolve inside the package, followed one component at a time through the
/// package's other links, and no entry may be placed through a link (see [`crate::links`]).
fn check_links(entries: &[Entry]) -> Result<(), ArchiveError> {
    crate::links::check(entries.iter().map(|e| match &e.kind {
        EntryKind::Symlink { target } => (e.path.as_str(), Some(target.as_str())),
        _ => (e.path.as_str(), None),
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn zip_of(build: impl FnOnce(&mut zip::ZipWriter<File>)) -> tempfile::NamedTempFile {
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        let mut w = zip::ZipWriter::new(tmp.reopen().expect("reopen"));
        build(&mut w);
        w.finish().expect("finish");
        tmp
    }

    fn opts() -> SimpleFileOptions {
        SimpleFileOptions::default().unix_permissions(0o755)
    }

    #[test]
    fn clean_package_lists_files_with_hashes() {
        let z = zip_of(|w| {
            w.add_directory("bin/", opts()).expect("dir");
            w.start_file("bin/app", opts()).expect("file");
            w.write_all(b"#!/bin/sh\necho hi\n").expect("write");
            w.add_symlink("bin/app-link", "app", opts()).expect("link");
        });
        let mut p = Package::open(z.path(), &ArchiveLimits::default()).expect("valid");
        let files = p.file_tree().expect("tree");
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].entry.path, "bin/app");
        assert_eq!(files[0].entry.mode, 0o755);
        let hash = blake3::hash(b"#!/bin/sh\necho hi\n").to_hex().to_string();
        assert_eq!(files[0].entry.blake3, hash);
        assert_eq!(
            files[0].chunks,
            ChunkList::Listed(vec![ChunkRef { id: hash, len: 18 }])
        );
        assert_eq!(files[1].entry.link.as_deref(), Some("app"));
    }

    fn code_of(z: &tempfile::NamedTempFile, limits: &ArchiveLimits) -> RejectCode {
        match Package::open(z.path(), limits) {
            Ok(_) => panic!("accepted a hostile archive"),
            Err(e) => e.code(),
        }
    }

    #[test]
    fn hostile_paths_and_links() {
        let l = ArchiveLimits::default();
        let z = zip_of(|w| w.start_file("../evil", opts()).expect("f"));
        assert_eq!(code_of(&z, &l), RejectCode::PathTraversal);
        let z = zip_of(|w| w.start_file("/etc/cron.d/evil", opts()).expect("f"));
        assert_eq!(code_of(&z, &l), RejectCode::AbsolutePath);
        let z = zip_of(|w| w.add_symlink("lib", "../../etc", opts()).expect("l"));
        assert_eq!(code_of(&z, &l), RejectCode::LinkOutsidePackage);
        let z = zip_of(|w| w.add_symlink("lib", "/etc/passwd", opts()).expect("l"));
        assert_eq!(code_of(&z, &l), RejectCode::LinkOutsidePackage);
        let z = zip_of(|w| {
            w.add_symlink("d", "sub", opts()).expect("l");
            w.start_file("d/x", opts()).expect("f");
        });
        assert_eq!(code_of(&z, &l), RejectCode::LinkOutsidePackage);
        // A chain: `y` stays inside, `z`'s text too, but through `y` it climbs out (issue 16).
        let z = zip_of(|w| {
            let deep = "a1/a2/a3/a4/a5/a6/a7/a8";
            w.start_file(format!("{deep}/keep"), opts()).expect("f");
            w.add_symlink(format!("{deep}/y"), "../../../../../../../../c", opts())
                .expect("l");
            let through = format!("{deep}/y/{}etc/passwd", "../".repeat(9));
            w.add_symlink("z", through, opts()).expect("l");
        });
        let err = Package::open(z.path(), &l).err().expect("refused");
        assert_eq!(err.code(), RejectCode::LinkOutsidePackage);
        assert!(err.to_string().contains("leaves the package"), "{err}");
    }

    #[test]
    fn limits() {
        let z = zip_of(|w| {
            for i in 0..5 {
                w.start_file(format!("f{i}"), opts()).expect("f");
            }
        });
        let few = ArchiveLimits {
            max_entries: 4,
            ..Default::default()
        };
        assert_eq!(code_of(&z, &few), RejectCode::TooManyEntries);

        let z = zip_of(|w| {
            w.start_file("zeros", opts()).expect("f");
            w.write_all(&vec![0u8; 4 << 20]).expect("w");
        });
        assert_eq!(
            code_of(&z, &ArchiveLimits::default()),
            RejectCode::CompressionRatio
        );
        let small = ArchiveLimits {
            max_total_bytes: 1 << 20,
            ..Default::default()
        };
        assert_eq!(code_of(&z, &small), RejectCode::TooLarge);
    }

    #[test]
    fn truncated_or_garbage() {
        let z = zip_of(|w| {
            w.start_file("a", opts()).expect("f");
            w.write_all(&[7u8; 1000]).expect("w");
        });
        let bytes = std::fs::read(z.path()).expect("read");
        let t = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(t.path(), &bytes[..bytes.len() / 2]).expect("write");
        assert_eq!(
            code_of(&t, &ArchiveLimits::default()),
            RejectCode::CorruptArchive
        );
        std::fs::write(t.path(), b"this is not a zip").expect("write");
        assert_eq!(
            code_of(&t, &ArchiveLimits::default()),
            RejectCode::CorruptArchive
        );
    }
}
