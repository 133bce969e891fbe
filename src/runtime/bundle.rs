//! An open bundle: its bytes (memory-mapped or owned) and its validated metadata.
//!
//! [`Bundle::open`] maps the file and validates header, manifest and section table — work that
//! does not grow with the weights. Section checksums are verified on first use of each section
//! (or all at once by [`Bundle::verify`]); a section that fails is never handed out.
//!
//! Mapping vs. reading is the caller's choice, and a real one (as in ripgrep, which maps files
//! only where that is safe):
//! - [`Bundle::open`] maps the file. The map shares pages with the OS cache and costs nothing up
//!   front, but it is shared with the file, not a snapshot: if another process rewrites the file
//!   in place while it is open, the bytes change under the bundle (after their checksums were
//!   checked), and if it truncates the file, the process dies of SIGBUS. The contract of `open`
//!   is that nobody does that; replacing the file by rename is fine (the map keeps the old one).
//! - [`Bundle::read`] copies the file into owned memory: use it for storage that may change under
//!   the process (removable media, network file systems, bundles an updater rewrites in place).
//!   [`Bundle::from_bytes`] takes bytes the caller already has.
//!
//! The C ABI offers the same choice (`tp_bundle_open` / `tp_bundle_read`), and the CLI
//! (`taskpack --no-mmap …`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::Mmap;

use crate::files::FileError;
use crate::format::{parse, Manifest, ParsedBundle, SectionId, SizeReport};
use crate::runtime::error::Error;

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A validated bundle.
pub struct Bundle {
    storage: Storage,
    parsed: ParsedBundle,
    verified: Vec<AtomicBool>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("bytes", &self.bytes().len())
            .field("tasks", &self.manifest().tasks.len())
            .finish_non_exhaustive()
    }
}

/// A failure to open or read a bundle file as [`Error::Io`]: an I/O error as it is, a path that is
/// not a regular file (a FIFO, a device, a directory) as an `InvalidInput` error saying what it is.
fn file_error(e: FileError) -> Error {
    match e {
        FileError::Io {
            action,
            path,
            source,
        } => Error::Io {
            action,
            path,
            source,
        },
        FileError::NotRegular { path, kind } => Error::Io {
            action: "open",
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("it is {kind}, not a regular file"),
            ),
        },
        other => Error::Io {
            action: "open",
            path: std::path::PathBuf::new(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

impl Bundle {
    /// Memory-maps and validates the bundle at `path`. The file must not be rewritten in place
    /// or truncated while the bundle lives (module docs); otherwise use [`Bundle::read`].
    pub fn open(path: impl AsRef<Path>) -> Result<Bundle, Error> {
        let path = path.as_ref();
        // A FIFO or a device is refused at once instead of blocking the open.
        let file = crate::files::open_regular(path).map_err(file_error)?;
        // The contract of `open` (module docs): the file is not rewritten while mapped.
        let map = crate::mmap::map_readonly(&file).map_err(|source| Error::Io {
            action: "map",
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(Storage::Mapped(map))
    }

    /// Reads the whole bundle at `path` into owned memory and validates it: later changes to the
    /// file do not affect the bundle.
    pub fn read(path: impl AsRef<Path>) -> Result<Bundle, Error> {
        let path = path.as_ref();
        let bytes = crate::files::read_regular(path).map_err(file_error)?;
        Self::new(Storage::Owned(bytes))
    }

    /// Validates a bundle already in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Bundle, Error> {
        Self::new(Storage::Owned(bytes))
    }

    fn new(storage: Storage) -> Result<Bundle, Error> {
        let parsed = parse(storage.bytes())?;
        let verified = (0..parsed.manifest().sections.len())
            .map(|_| AtomicBool::new(false))
            .collect();
        Ok(Bundle {
            storage,
            parsed,
            verified,
        })
    }

    /// The bundle's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The validated metadata.
    pub fn parsed(&self) -> &ParsedBundle {
        &self.parsed
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        self.parsed.manifest()
    }

    /// Bytes per part of the bundle.
    pub fn sizes(&self) -> SizeReport {
        self.parsed.sizes()
    }

    /// Checks every checksum and every rule that needs the bulk bytes. Reads the whole file.
    pub fn verify(&self) -> Result<(), Error> {
        self.parsed.verify(self.bytes())?;
        self.verified
            .iter()
            .for_each(|v| v.store(true, Ordering::Relaxed));
        Ok(())
    }

    /// Index of the task called `name`.
    pub fn task_index(&self, name: &str) -> Result<usize, Error> {
        self.parsed
            .task_index(name)
            .ok_or_else(|| Error::UnknownTask {
                name: name.to_string(),
                known: self
                    .manifest()
                    .tasks
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The bytes of section `id`, checksum-verified on first use.
    pub fn section(&self, id: SectionId) -> Result<&[u8], Error> {
        let flag = usize::try_from(id).ok().and_then(|i| self.verified.get(i));
        if let Some(flag) = flag {
            if !flag.load(Ordering::Acquire) {
                self.parsed.verify_section(self.bytes(), id)?;
                flag.store(true, Ordering::Release);
            }
        }
        Ok(self.parsed.section(self.bytes(), id)?)
    }

    /// Decodes a numeric section to `f32` into `out`, checksum-verified on first use.
    pub fn decode_f32(&self, id: SectionId, out: &mut Vec<f32>) -> Result<(), Error> {
        self.section(id)?;
        Ok(self.parsed.decode_f32(self.bytes(), id, out)?)
    }
}
