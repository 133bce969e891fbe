//! Reading numpy's `.npy` and `.npz` files into tract tensors, sized before anything is
//! allocated (feature `npz`, part of `cli`).
//!
//! Why one reader: the CLI reads arrays to run a task (`taskpack run --input`), to calibrate
//! (`compile --calib`) and to evaluate the demo; the files come from anyone. `ndarray-npy`
//! parses them, but allocates what an array's header declares before reading a byte of data: a
//! 12 KB file declaring a shape of `(2^40, 1, 28, 28)` aborted the process. Here, before any array
//! is allocated:
//! - the file is opened without blocking (a named pipe is refused, not waited on) and must be a
//!   regular file;
//! - the `.npy` header is read with a bounded length (64 KiB) and its declared size
//!   (shape × element size, checked arithmetic) must equal the bytes that follow it: the rest of
//!   the `.npy` file, or the uncompressed size the `.npz` (zip) entry declares, itself plausible
//!   for its compressed size (deflate expands at most 1032×; a stored entry
//!   not at all);
//! - the arrays read through one [`Limits`] stay under [`Limits::max_bytes`] in total;
//! - the data is then read through a reader that stops one byte past the declared size, so an
//!   entry that inflates to more than it declares is an error, not an allocation.
//!
//! Element types: `f32`, `f64`, `i8`–`i64`, `u8`–`u64` and `bool`, little- or big-endian, C or
//! Fortran order, each read as its own tract type.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray_npy::npy::header::Header;
use ndarray_npy::ReadableElement;
use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn, ShapeBuilder};
use tract_onnx::prelude::{Datum, DatumType, Tensor};
use zip::{CompressionMethod, ZipArchive};

/// Longest `.npy` header accepted (numpy writes a few hundred bytes; format 1.0 allows 64 KiB).
pub(crate) const MAX_HEADER_BYTES: usize = 1 << 16;

/// Most a deflate stream can expand (≈ 1032:1, plus room for the stream's framing).
pub(crate) const MAX_DEFLATE_RATIO: u64 = 1032;

/// Caps on what a read may allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Most bytes of array data, in total over the arrays read through these limits (a
    /// [`Npz`] counts every array it reads). Default: [`Limits::DEFAULT_MAX_BYTES`].
    pub max_bytes: u64,
}

impl Limits {
    /// Default of [`Limits::max_bytes`]: 256 MiB (the runtime's default input cap).
    pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

    /// Limits allowing `max_bytes` bytes of array data.
    pub fn with_max_bytes(max_bytes: u64) -> Limits {
        Limits { max_bytes }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::with_max_bytes(Self::DEFAULT_MAX_BYTES)
    }
}

/// Everything that can go wrong reading an `.npy` or `.npz` file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NpzError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a regular file (a directory, a named pipe, a device...).
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file is not a zip archive (`.npz`), or an entry cannot be opened.
    #[error("{path} is not a readable .npz file: {message}")]
    Zip {
        /// The file.
        path: PathBuf,
        /// Why, from the zip reader.
        message: String,
    },
    /// No array of that name.
    #[error("{path} has no array {name:?} (it has: {known})")]
    NoArray {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// The names it has, comma-separated.
        known: String,
    },
    /// An array's `.npy` header is malformed.
    #[error("{path}: array {array:?}: bad .npy header: {message}")]
    Header {
        /// The file.
        path: PathBuf,
        /// The array (empty for an `.npy` file).
        array: String,
        /// What is wrong.
        message: String,
    },
    /// An array's element type is not one the reader takes.
    #[error(
        "{path}: array {array:?}: element type {descr} is not supported (f32, f64, i8-i64, u8-u64 \
         and bool are)"
    )]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// The array.
        array: String,
        /// numpy's type descriptor, e.g. `'<c8'`.
        descr: String,
    },
    /// An array's header declares another size than the bytes that follow it (the file, or the
    /// zip entry's declared size), or more than the arithmetic can hold.
    #[error(
        "{path}: array {array:?}: its header declares shape {shape:?} of {dtype:?} ({declared} \
         bytes) but {available} bytes follow it"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The array.
        array: String,
        /// The declared shape.
        shape: Vec<usize>,
        /// The declared element type.
        dtype: DatumType,
        /// Bytes the shape needs (`None` when it overflows).
        declared: DeclaredBytes,
        /// Bytes there are.
        available: u64,
    },
    /// A zip entry declares an uncompressed size its compressed size cannot produce.
    #[error(
        "{path}: array {array:?}: declares {size} bytes from {compressed} compressed bytes \
         ({method}), which cannot be"
    )]
    ImplausibleEntry {
        /// The file.
        path: PathBuf,
        /// The array.
        array: String,
        /// Declared uncompressed size.
        size: u64,
        /// Compressed size.
        compressed: u64,
        /// The compression method.
        method: String,
    },
    /// The arrays read hold more bytes than [`Limits::max_bytes`].
    #[error(
        "{path}: array {array:?}: {bytes} bytes of data would exceed the limit of {limit} bytes \
         of input (raise it with --max-input-bytes)"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The array that crosses the limit.
        array: String,
        /// Bytes of the arrays read so far, this one included.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The array data is truncated, corrupt (zip checksum) or otherwise unreadable.
    #[error("{path}: array {array:?}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// The array.
        array: String,
        /// What went wrong.
        message: String,
    },
}

/// The byte size a header declares, or that it overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeclaredBytes(pub Option<u64>);

impl std::fmt::Display for DeclaredBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(b) => write!(f, "{b}"),
            None => f.write_str("more than 2^64"),
        }
    }
}

/// Opens `path` for reading only if it is a regular file, without ever blocking
/// ([`crate::files::open_regular`]). Returns the file and its size.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64), NpzError> {
    let file = crate::files::open_regular(path).map_err(|e| match e {
        crate::files::FileError::NotRegular { .. } => NpzError::NotAFile {
            path: path.to_path_buf(),
        },
        crate::files::FileError::Io { source, .. } => NpzError::Io {
            path: path.to_path_buf(),
            source,
        },
        // open_regular gives no other kind; keep its message if that ever changes.
        other => NpzError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(other),
        },
    })?;
    let len = file
        .metadata()
        .map_err(|source| NpzError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    Ok((file, len))
}

/// The one array of the `.npy` file `path`, as its own element type.
pub fn read_npy(path: &Path, limits: &Limits) -> Result<Tensor, NpzError> {
    let (file, len) = open_regular(path)?;
    let mut budget = Budget::new(limits);
    let mut ctx = Ctx {
        path,
        array: "",
        budget: &mut budget,
    };
    ctx.read_array(file, len)
}

/// Every array of the `.npz` file `path`, by name (without `.npy`), in the file's order.
pub fn read_npz(path: &Path, limits: &Limits) -> Result<Vec<(String, Tensor)>, NpzError> {
    let mut npz = Npz::open(path, limits)?;
    let names = npz.names().to_vec();
    names
        .into_iter()
        .map(|name| npz.read(&name).map(|t| (name, t)))
        .collect()
}

/// An open `.npz` file: list its arrays, read the ones needed.
pub struct Npz {
    path: PathBuf,
    archive: ZipArchive<File>,
    names: Vec<String>,
    budget: Budget,
}

impl std::fmt::Debug for Npz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Npz")
            .field("path", &self.path)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Npz {
    /// Opens `path` (a regular file, opened as the module docs say) and reads its zip directory. The
    /// arrays read later count against `limits` together.
    pub fn open(path: &Path, limits: &Limits) -> Result<Npz, NpzError> {
        let (file, _) = open_regular(path)?;
        let archive = ZipArchive::new(file).map_err(|e| NpzError::Zip {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let names = archive
            .file_names()
            .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
            .collect();
        Ok(Npz {
            path: path.to_path_buf(),
            archive,
            names,
            budget: Budget::new(limits),
        })
    }

    /// Names of the arrays (entry names without `.npy`), in the file's order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Reads array `name` (with or without `.npy`) as its own element type.
    pub fn read(&mut self, name: &str) -> Result<Tensor, NpzError> {
        let path = self.path.as_path();
        let zip = |e: zip::result::ZipError| NpzError::Zip {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let index = self
            .archive
            .index_for_name(&format!("{name}.npy"))
            .or_else(|| self.archive.index_for_name(name))
            .ok_or_else(|| NpzError::NoArray {
                path: path.to_path_buf(),
                name: name.to_string(),
                known: self.names.join(", "),
            })?;
        let entry = self.archive.by_index(index).map_err(zip)?;
        let (size, compressed, method) =
            (entry.size(), entry.compressed_size(), entry.compression());
        let plausible = match method {
            CompressionMethod::Stored => size == compressed,
            _ => {
                size <= compressed
                    .saturating_mul(MAX_DEFLATE_RATIO)
                    .saturating_add(64)
            }
        };
        if !plausible {
            return Err(NpzError::ImplausibleEntry {
                path: path.to_path_buf(),
                array: name.to_string(),
                size,
                compressed,
                method: method.to_string(),
            });
        }
        let mut ctx = Ctx {
            path,
            array: name,
            budget: &mut self.budget,
        };
        ctx.read_array(entry, size)
    }
}

/// Bytes of array data still allowed.
#[derive(Debug)]
struct Budget {
    used: u64,
    limit: u64,
}

impl Budget {
    fn new(limits: &Limits) -> Budget {
        Budget {
            used: 0,
            limit: limits.max_bytes,
        }
    }
}

/// The array being read, for errors, and the budget it counts against.
struct Ctx<'a> {
    path: &'a Path,
    array: &'a str,
    budget: &'a mut Budget,
}

impl Ctx<'_> {
    fn header_error(&self, message: impl Into<String>) -> NpzError {
        NpzError::Header {
            path: self.path.to_path_buf(),
            array: self.array.to_string(),
            message: message.into(),
        }
    }

    fn data_error(&self, message: impl std::fmt::Display) -> NpzError {
        NpzError::Data {
            path: self.path.to_path_buf(),
            array: self.array.to_string(),
            message: message.to_string(),
        }
    }

    /// Reads one `.npy` stream of `len` bytes (header included) from `reader`.
    fn read_array(&mut self, mut reader: impl Read, len: u64) -> Result<Tensor, NpzError> {
        let (header, header_len) = self.read_header(&mut reader, len)?;
        let descr = header
            .type_descriptor
            .as_string()
            .cloned()
            .unwrap_or_else(|| header.type_descriptor.to_string());
        let dtype = dtype_of(&descr).ok_or_else(|| NpzError::UnsupportedType {
            path: self.path.to_path_buf(),
            array: self.array.to_string(),
            descr: descr.clone(),
        })?;
        let count = header
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?));
        let declared = count.and_then(|c| c.checked_mul(dtype.size_of() as u64));
        let available = len.saturating_sub(header_len);
        let (Some(bytes), Some(count)) = (declared.filter(|&b| b == available), count) else {
            return Err(NpzError::SizeMismatch {
                path: self.path.to_path_buf(),
                array: self.array.to_string(),
                shape: header.shape,
                dtype,
                declared: DeclaredBytes(declared),
                available,
            });
        };
        let total = self.budget.used.saturating_add(bytes);
        if total > self.budget.limit {
            return Err(NpzError::TooLarge {
                path: self.path.to_path_buf(),
                array: self.array.to_string(),
                bytes: total,
                limit: self.budget.limit,
            });
        }
        // Fits the budget, which is at most what the caller allows in memory.
        let count = usize::try_from(count).map_err(|_| self.data_error("too large"))?;
        // One byte past the declared size: a stream that holds more is reported, not read.
        let limited = reader.take(bytes.saturating_add(1));
        let fortran = header.layout.is_fortran();
        let shape = header.shape.as_slice();
        let tensor = match dtype {
            DatumType::F32 => self.read_data::<f32>(limited, &header, count, shape, fortran),
            DatumType::F64 => self.read_data::<f64>(limited, &header, count, shape, fortran),
            DatumType::I8 => self.read_data::<i8>(limited, &header, count, shape, fortran),
            DatumType::I16 => self.read_data::<i16>(limited, &header, count, shape, fortran),
            DatumType::I32 => self.read_data::<i32>(limited, &header, count, shape, fortran),
            DatumType::I64 => self.read_data::<i64>(limited, &header, count, shape, fortran),
            DatumType::U8 => self.read_data::<u8>(limited, &header, count, shape, fortran),
            DatumType::U16 => self.read_data::<u16>(limited, &header, count, shape, fortran),
            DatumType::U32 => self.read_data::<u32>(limited, &header, count, shape, fortran),
            DatumType::U64 => self.read_data::<u64>(limited, &header, count, shape, fortran),
            _ => self.read_data::<bool>(limited, &header, count, shape, fortran),
        }?;
        self.budget.used = total;
        Ok(tensor)
    }

    /// The header of a `.npy` stream of `len` bytes and its length in bytes, read with a bounded
    /// buffer (the header-length field may claim 4 GiB).
    fn read_header(&self, reader: &mut impl Read, len: u64) -> Result<(Header, u64), NpzError> {
        let mut prefix = [0u8; 8];
        reader
            .read_exact(&mut prefix)
            .map_err(|e| self.header_error(format!("cannot read the magic string: {e}")))?;
        let [b'\x93', b'N', b'U', b'M', b'P', b'Y', major, _minor] = prefix else {
            return Err(self.header_error("no .npy magic string"));
        };
        let mut bytes = prefix.to_vec();
        let header_len = match major {
            1 => {
                let mut n = [0u8; 2];
                reader
                    .read_exact(&mut n)
                    .map_err(|e| self.header_error(e.to_string()))?;
                bytes.extend_from_slice(&n);
                usize::from(u16::from_le_bytes(n))
            }
            2 | 3 => {
                let mut n = [0u8; 4];
                reader
                    .read_exact(&mut n)
                    .map_err(|e| self.header_error(e.to_string()))?;
                bytes.extend_from_slice(&n);
                usize::try_from(u32::from_le_bytes(n)).unwrap_or(usize::MAX)
            }
            v => return Err(self.header_error(format!("unknown format version {v}"))),
        };
        let total = bytes.len().saturating_add(header_len);
        if header_len > MAX_HEADER_BYTES || total as u64 > len {
            return Err(self.header_error(format!(
                "declares a header of {header_len} bytes (at most {MAX_HEADER_BYTES}, within the \
                 {len} bytes of the array)"
            )));
        }
        let start = bytes.len();
        bytes.resize(total, 0);
        if let Some(rest) = bytes.get_mut(start..) {
            reader
                .read_exact(rest)
                .map_err(|e| self.header_error(e.to_string()))?;
        }
        let header = Header::from_reader(&mut bytes.as_slice())
            .map_err(|e| self.header_error(e.to_string()))?;
        Ok((header, total as u64))
    }

    fn read_data<T: ReadableElement + Datum>(
        &self,
        reader: impl Read,
        header: &Header,
        count: usize,
        shape: &[usize],
        fortran: bool,
    ) -> Result<Tensor, NpzError> {
        let data = T::read_to_end_exact_vec(reader, &header.type_descriptor, count)
            .map_err(|e| self.data_error(e))?;
        let array = ArrayD::from_shape_vec(IxDyn(shape).set_f(fortran), data)
            .map_err(|e| self.data_error(e))?;
        Ok(if fortran {
            Tensor::from(array.as_standard_layout().into_owned())
        } else {
            Tensor::from(array)
        })
    }
}

/// The tract type of numpy type descriptor `descr` (e.g. `<f4`), if the reader takes it.
fn dtype_of(descr: &str) -> Option<DatumType> {
    let code = descr.strip_prefix(['<', '>', '|', '=']).unwrap_or(descr);
    Some(match code {
        "f4" => DatumType::F32,
        "f8" => DatumType::F64,
        "i1" => DatumType::I8,
        "i2" => DatumType::I16,
        "i4" => DatumType::I32,
        "i8" => DatumType::I64,
        "u1" => DatumType::U8,
        "u2" => DatumType::U16,
        "u4" => DatumType::U32,
        "u8" => DatumType::U64,
        "b1" => DatumType::Bool,
        _ => return None,
    })
}
