//! Streaming, atomic bundle writer (docs/FORMAT.md §9).
//!
//! The compiler produces sections one tensor at a time; [`BundleWriter`] streams each to a
//! temporary file next to the destination as soon as it is added (with its zero padding and
//! checksum), so the weights are never all in memory. [`BundleWriter::finish`] checks the
//! manifest with the reader's own structural checks, appends it, writes the header over the
//! zeroed placeholder, runs the reader's whole validation ([`parse`] and
//! [`ParsedBundle::verify`](super::ParsedBundle::verify)) on the file it wrote, and commits the
//! file. The file mechanics (destination checks, temporary file, sync, rename, folder sync,
//! removal on drop) are [`crate::files::AtomicFile`]'s, the one atomic writer of the crate: until
//! the rename nothing exists at the destination, and dropping an unfinished writer (an error, a
//! panic) removes the temporary file, so an interrupted compile leaves nothing behind.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

use super::error::FormatError;
use super::header::Header;
use super::layout::{self, MAX_MANIFEST_LEN, MAX_SECTIONS};
use super::manifest::{Manifest, SectionEntry, SectionId, SectionKind};
use super::reader::{check_manifest, parse};
use crate::files::{AtomicFile, FileError};

/// Zeros written as padding (at most `ALIGNMENT - 1` bytes are needed at a time).
const ZEROS: [u8; layout::ALIGNMENT as usize] = [0; layout::ALIGNMENT as usize];

/// Writes a bundle section by section into a temporary file, then atomically into place.
#[derive(Debug)]
pub struct BundleWriter {
    out_path: PathBuf,
    tmp_path: PathBuf,
    /// `None` once finished (or taken apart by `Drop`).
    file: Option<BufWriter<AtomicFile>>,
    sections: Vec<SectionEntry>,
    /// End of the last section, relative to the data region.
    data_end: u64,
    /// Set by any error after bytes may have been written: the file is then unusable.
    failed: bool,
}

/// Receives the bytes of one section in [`BundleWriter::add_section_with`]; hashes them as they
/// pass.
pub struct SectionSink<'a> {
    out: &'a mut BufWriter<AtomicFile>,
    hasher: Xxh3Default,
    length: u64,
}

impl std::fmt::Debug for SectionSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectionSink")
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl Write for SectionSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        let written = buf.get(..n).unwrap_or(buf);
        self.hasher.update(written);
        self.length = self
            .length
            .checked_add(n as u64)
            .ok_or_else(|| io::Error::other("section longer than u64::MAX bytes"))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A file error as a [`FormatError`]: plain I/O failures keep their [`FormatError::Io`] shape.
fn file_error(e: FileError) -> FormatError {
    match e {
        FileError::Io {
            action,
            path,
            source,
        } => FormatError::Io {
            action,
            path,
            source,
        },
        other => FormatError::File(other),
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FormatError {
    let path = path.to_owned();
    move |source| FormatError::Io {
        action,
        path,
        source,
    }
}

impl BundleWriter {
    /// Starts a bundle that [`finish`](Self::finish) will put at `out_path`: checks the
    /// destination ([`crate::files::check_output`]: absent or a regular file, symbolic links
    /// followed), creates the temporary file `.{name}.tmp.{pid}.{n}` in the same directory and
    /// writes the header placeholder. Fails if the directory does not exist or is not writable.
    pub fn create(out_path: impl AsRef<Path>) -> Result<BundleWriter, FormatError> {
        let out_path = out_path.as_ref().to_owned();
        let file = AtomicFile::create(&out_path).map_err(file_error)?;
        let tmp_path = file.temp_path().to_owned();
        let mut w = BundleWriter {
            out_path,
            tmp_path,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            sections: Vec::new(),
            data_end: 0,
            failed: false,
        };
        // From here on, an error drops `w`, which removes the temporary file.
        let placeholder = [0u8; Header::LEN];
        w.with_file(|f| f.write_all(&placeholder))?;
        Ok(w)
    }

    /// The temporary file being written (removed or renamed by the time the writer is gone).
    pub fn temp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// Runs a write on the file, turning failures into [`FormatError::Io`] and poisoning the
    /// writer.
    fn with_file<T>(
        &mut self,
        f: impl FnOnce(&mut BufWriter<AtomicFile>) -> io::Result<T>,
    ) -> Result<T, FormatError> {
        let (Some(file), false) = (self.file.as_mut(), self.failed) else {
            return Err(FormatError::WriterFailed {
                path: self.out_path.clone(),
            });
        };
        f(file).map_err(|e| {
            self.failed = true;
            io_error("write temporary file", &self.tmp_path)(e)
        })
    }

    /// Appends a section holding `bytes`; returns its id.
    pub fn add_section(
        &mut self,
        kind: SectionKind,
        bytes: &[u8],
    ) -> Result<SectionId, FormatError> {
        self.add_section_with(kind, |sink| sink.write_all(bytes))
    }

    /// Appends a section whose bytes `fill` writes to the sink, in as many chunks as it likes
    /// (e.g. a tensor encoded block by block); returns its id. An error from `fill` makes the
    /// writer unusable (the section is incomplete): report it, then drop the writer.
    pub fn add_section_with(
        &mut self,
        kind: SectionKind,
        fill: impl FnOnce(&mut SectionSink<'_>) -> io::Result<()>,
    ) -> Result<SectionId, FormatError> {
        if self.sections.len() >= MAX_SECTIONS {
            return Err(FormatError::TooManySections {
                count: self.sections.len() as u64 + 1,
                max: MAX_SECTIONS as u64,
            });
        }
        let offset = layout::align_up(self.data_end)?;
        let pad = layout::to_usize(layout::padding_after(self.data_end)?)?;
        let (length, checksum) = self.with_file(|out| {
            out.write_all(ZEROS.get(..pad).unwrap_or(&ZEROS))?;
            let mut sink = SectionSink {
                out,
                hasher: Xxh3Default::new(),
                length: 0,
            };
            fill(&mut sink)?;
            Ok((sink.length, sink.hasher.digest()))
        })?;
        let end = layout::end(offset, length).inspect_err(|_| self.failed = true)?;
        let id = self.sections.len() as SectionId;
        self.sections.push(SectionEntry {
            offset,
            length,
            checksum,
            kind,
        });
        self.data_end = end;
        Ok(id)
    }

    /// The path the bundle is committed to by [`BundleWriter::finish`].
    pub(crate) fn dest(&self) -> &Path {
        &self.out_path
    }

    /// Completes the bundle: fills in `manifest.sections` (which must be empty) with the sections
    /// added, checks the manifest against rules 13–34, appends it, writes the header, validates
    /// the written file exactly as a reader does (rules 1–37 and V1–V7, reading it back through
    /// a memory map), syncs the file, renames it over the destination and syncs the directory.
    /// Returns the file length.
    ///
    /// On error the temporary file is removed and nothing is left at the destination (except if
    /// only the final directory sync fails: the bundle is then in place but its durability
    /// across a power loss is unknown).
    pub fn finish(mut self, mut manifest: Manifest) -> Result<u64, FormatError> {
        if self.failed {
            return Err(FormatError::WriterFailed {
                path: self.out_path.clone(),
            });
        }
        if !manifest.sections.is_empty() {
            return Err(FormatError::SectionsAlreadySet(
                manifest.sections.len() as u64
            ));
        }
        manifest.sections = std::mem::take(&mut self.sections);
        check_manifest(&manifest, self.data_end)?;
        let bytes = postcard::to_stdvec(&manifest)
            .map_err(|e| FormatError::ManifestEncode(e.to_string()))?;
        let manifest_length = bytes.len() as u64;
        if manifest_length > MAX_MANIFEST_LEN {
            return Err(FormatError::ManifestTooLarge {
                length: manifest_length,
                max: MAX_MANIFEST_LEN,
            });
        }
        let header = Header::new(self.data_end, manifest_length, xxh3_64(&bytes))?;
        self.with_file(|f| f.write_all(&bytes))?;

        let Some(buffered) = self.file.take() else {
            return Err(FormatError::WriterFailed {
                path: self.out_path.clone(),
            });
        };
        let tmp = self.tmp_path.clone();
        let mut file = buffered
            .into_inner()
            .map_err(|e| io_error("write temporary file", &tmp)(e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header.to_bytes()))
            .map_err(io_error("write header of temporary file", &tmp))?;
        validate_written(&tmp)?;
        file.commit().map_err(file_error)?;
        log::debug!(
            "wrote bundle {} ({} bytes, {} sections)",
            self.out_path.display(),
            header.file_length,
            manifest.sections.len()
        );
        Ok(header.file_length)
    }
}

/// Runs the reader's validation — `parse` (rules 1–37) and `verify` (V1–V7) — on the bundle
/// just written to `path`, so that the writer never produces a bundle a reader rejects
/// (docs/FORMAT.md §9). The file is the writer's own temporary file: nobody else rewrites it
/// while it is mapped (the contract of `crate::mmap`).
fn validate_written(path: &Path) -> Result<(), FormatError> {
    let file = File::open(path).map_err(io_error("reopen temporary file", path))?;
    let map = crate::mmap::map_readonly(&file).map_err(io_error("map temporary file", path))?;
    let bytes: &[u8] = &map;
    parse(bytes)?.verify(bytes)
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if let Some(w) = self.file.take() {
            // Close without flushing the buffer into a file about to be deleted; dropping the
            // uncommitted `AtomicFile` removes it.
            let (file, _) = w.into_parts();
            drop(file);
        }
    }
}
