//! Opening input files safely and writing output files atomically: the one place taskpack
//! touches a path it was given.
//!
//! Paths come from users and scripts, and a wrong one must not hang the process or destroy a
//! file:
//! - [`open_regular`] opens an input without blocking (a named pipe or a device would otherwise
//!   block in `open` or `read` forever) and refuses anything that is not a regular file, before a
//!   single byte is read.
//! - [`AtomicFile`] (and [`write_atomic`] for bytes in memory) writes an output into a temporary
//!   file in the destination's folder, syncs it, renames it over the destination and syncs the
//!   folder: readers see the old file or the whole new one, never a part. An error or a drop
//!   before [`AtomicFile::commit`] removes the temporary file.
//! - [`check_output`] refuses a destination that exists and is not a regular file (a device,
//!   a FIFO, a directory), so that `-o /dev/null` cannot replace the device node. A symbolic link
//!   is followed: the rule applies to its final target, the target is what gets replaced (the
//!   link stays), and a link to nothing is refused.
//! - [`check_not_input`] refuses an output that is the same file (device and inode on unix) as
//!   one of the inputs, before anything is written.
//! - Temporary files are registered while they exist. The library installs no signal handler;
//!   a program that wants to clean up on SIGINT/SIGTERM calls [`remove_temporary_files`] from
//!   its handler thread before exiting (the `taskpack` CLI does).
//!
//! A file can still change between a check and its use (another process renaming something
//! into place); the checks guard against mistakes, not against a hostile process with the same
//! rights.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// What can go wrong opening an input or writing an output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The path exists but is not a regular file (a FIFO, a device, a directory, a socket).
    #[error("{} is {kind}, not a regular file", path.display())]
    NotRegular {
        /// The path as given.
        path: PathBuf,
        /// What it is instead (`"a FIFO"`, `"a character device"`, ...).
        kind: &'static str,
    },
    /// The output path is a symbolic link whose target does not exist.
    #[error("{} is a symbolic link to a missing file", path.display())]
    DanglingSymlink {
        /// The link.
        path: PathBuf,
    },
    /// The output is the same file as one of the inputs: writing it would destroy the input.
    #[error("the output {} is the input {}: choose another output file", output.display(), input.display())]
    OutputIsInput {
        /// The output path.
        output: PathBuf,
        /// The input path it is the same file as.
        input: PathBuf,
    },
    /// The process is exiting ([`remove_temporary_files`] ran): no new output is written.
    #[error("not writing {}: the process is being terminated", path.display())]
    Terminating {
        /// The output that was not written.
        path: PathBuf,
    },
    /// An I/O operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`open`, `create`, `sync`, `rename to`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError::Io {
        action,
        path,
        source,
    }
}

/// What a non-regular file is, in words.
fn describe(file_type: fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Opens `path` for reading if it is a regular file (symbolic links are followed).
///
/// On unix the file is opened with `O_NONBLOCK` (and `O_NOCTTY`), so that opening a FIFO or a
/// device returns at once; its type is then checked on the open descriptor (no race with a
/// rename), anything but a regular file is refused with [`FileError::NotRegular`], and
/// `O_NONBLOCK` is cleared again before the file is returned.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(io_error("open", path))?;
    let meta = file.metadata().map_err(io_error("inspect", path))?;
    if !meta.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
            kind: describe(meta.file_type()),
        });
    }
    #[cfg(unix)]
    clear_nonblocking(&file).map_err(io_error("open", path))?;
    Ok(file)
}

/// Clears `O_NONBLOCK` on an open file (it has no effect on regular files under Linux, but
/// POSIX leaves it unspecified, and the descriptor may be handed to other code).
#[cfg(unix)]
fn clear_nonblocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is a valid open descriptor owned by `file` for the duration of the call;
    // F_GETFL takes no further argument and touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL takes an int argument (the new status flags).
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a whole regular file ([`open_regular`], then `read_to_end`).
pub fn read_regular(path: &Path) -> Result<Vec<u8>, FileError> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    Ok(bytes)
}

/// Checks that `path` may be (re)placed by a new file, and returns the path to replace.
///
/// - Nothing there: `path` itself.
/// - A regular file: `path` itself.
/// - A symbolic link: its final target, which must be a regular file (a link to nothing gives
///   [`FileError::DanglingSymlink`]); replacing the target keeps the link.
/// - Anything else (directory, FIFO, device, socket): [`FileError::NotRegular`].
pub fn check_output(path: &Path) -> Result<PathBuf, FileError> {
    if path.file_name().is_none() {
        return Err(FileError::Io {
            action: "create",
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        });
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(path.to_owned()),
        Err(e) => return Err(io_error("inspect", path)(e)),
    };
    if meta.is_file() {
        return Ok(path.to_owned());
    }
    if !meta.file_type().is_symlink() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
            kind: describe(meta.file_type()),
        });
    }
    let target = match fs::canonicalize(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FileError::DanglingSymlink {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(io_error("resolve", path)(e)),
    };
    let meta = fs::metadata(&target).map_err(io_error("inspect", &target))?;
    if !meta.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
            kind: describe(meta.file_type()),
        });
    }
    Ok(target)
}

/// Device and inode on unix, the canonical path elsewhere.
#[derive(PartialEq, Eq)]
struct FileId(#[cfg(unix)] (u64, u64), #[cfg(not(unix))] PathBuf);

/// The identity of an existing file (symbolic links followed), if it can be found.
#[cfg(unix)]
fn identity(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| FileId((m.dev(), m.ino())))
}

/// The identity of an existing file (symbolic links followed), if it can be found.
#[cfg(not(unix))]
fn identity(path: &Path) -> Option<FileId> {
    fs::canonicalize(path).ok().map(FileId)
}

/// Refuses an `output` that is the same file as any of `inputs` ([`FileError::OutputIsInput`],
/// naming the first such input). Hard links and symbolic links count as the same file. An
/// output that does not exist yet, and inputs that cannot be found, never clash.
pub fn check_not_input<'a>(
    output: &Path,
    inputs: impl IntoIterator<Item = &'a Path>,
) -> Result<(), FileError> {
    let Some(out) = identity(output) else {
        return Ok(());
    };
    for input in inputs {
        if identity(input).is_some_and(|id| id == out) {
            return Err(FileError::OutputIsInput {
                output: output.to_owned(),
                input: input.to_owned(),
            });
        }
    }
    Ok(())
}

/// Temporary files that exist right now, for [`remove_temporary_files`].
struct Registry {
    paths: Vec<PathBuf>,
    /// Set by [`remove_temporary_files`]: nothing new is created or renamed into place.
    closed: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    paths: Vec::new(),
    closed: false,
});

fn registry() -> MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves the list consistent (every operation on it is one
    // push, one retain or one clear).
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes every temporary file an unfinished [`AtomicFile`] (or a registered scratch file)
/// holds right now, and makes later creations and commits fail with
/// [`FileError::Terminating`]. Returns how many files were removed.
///
/// For a signal handler that then exits: call it from a normal thread (e.g. the thread a
/// signal-handling crate runs handlers on), not from inside an async signal handler, since it
/// takes a lock and allocates. Creation, commit and this function are serialized, so a file is
/// either renamed into place whole or removed.
pub fn remove_temporary_files() -> usize {
    let mut reg = registry();
    reg.closed = true;
    let mut removed = 0;
    for path in reg.paths.drain(..) {
        if fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A path removed (if it exists) when dropped or by [`remove_temporary_files`], whichever
/// comes first.
#[derive(Debug)]
pub(crate) struct TempPath {
    path: PathBuf,
}

impl TempPath {
    /// Registers `path` and runs `create` on it under the registry lock, so that a concurrent
    /// [`remove_temporary_files`] sees either nothing or the registered file.
    pub(crate) fn create_with<T>(
        path: PathBuf,
        create: impl FnOnce(&Path) -> io::Result<T>,
    ) -> Result<(TempPath, T), FileError> {
        let mut reg = registry();
        if reg.closed {
            return Err(FileError::Terminating { path });
        }
        let value = create(&path).map_err(io_error("create temporary file", &path))?;
        reg.paths.push(path.clone());
        Ok((TempPath { path }, value))
    }

    /// Registers a path that something else will create (e.g. a scratch bundle).
    #[cfg_attr(not(feature = "compiler"), allow(dead_code))]
    pub(crate) fn register(path: PathBuf) -> Result<TempPath, FileError> {
        Self::create_with(path, |_| Ok(())).map(|(t, ())| t)
    }

    /// The path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file at this path over `dest` (checked again: it must still be absent or a
    /// regular file) and syncs `dest`'s folder; the path is then no longer removed on drop.
    pub(crate) fn persist_to(self, dest: &Path) -> Result<(), FileError> {
        self.persist_with(|tmp| {
            // The destination may have been replaced by a FIFO or a directory meanwhile.
            check_output(dest)?;
            fs::rename(tmp, dest).map_err(io_error("rename the temporary file to", dest))
        })?;
        sync_dir(parent_dir(dest))
    }

    /// Runs `f` (e.g. renaming the file away) and unregisters the path, under the registry
    /// lock; the path is then no longer removed on drop. Fails, without running `f`, once
    /// [`remove_temporary_files`] has run.
    fn persist_with(
        mut self,
        f: impl FnOnce(&Path) -> Result<(), FileError>,
    ) -> Result<(), FileError> {
        let mut reg = registry();
        if reg.closed {
            return Err(FileError::Terminating {
                path: self.path.clone(),
            });
        }
        f(&self.path)?;
        reg.paths.retain(|p| p != &self.path);
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let mut reg = registry();
        reg.paths.retain(|p| p != &self.path);
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove temporary file {}: {e}", self.path.display()),
        }
    }
}

/// Distinguishes temporary files of several writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The folder of `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An output file being written: a temporary file `.{name}.tmp.{pid}.{n}` in the destination's
/// folder until [`commit`](Self::commit) renames it into place. Dropping it uncommitted removes
/// the temporary file. Writes and seeks go to the temporary file (unbuffered: wrap it in a
/// `BufWriter` for small writes).
#[derive(Debug)]
pub struct AtomicFile {
    /// The path that will be replaced (a symbolic link's target).
    dest: PathBuf,
    file: File,
    temp: TempPath,
}

impl AtomicFile {
    /// Checks the destination ([`check_output`]) and creates the temporary file beside it.
    /// Fails if the folder does not exist or is not writable.
    pub fn create(dest: &Path) -> Result<AtomicFile, FileError> {
        let dest = check_output(dest)?;
        let Some(name) = dest.file_name() else {
            return Err(io_error("create", &dest)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path has no file name",
            )));
        };
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}.{n}", std::process::id()));
        let tmp_path = dest.with_file_name(tmp_name);
        let (temp, file) = TempPath::create_with(tmp_path, |p| {
            OpenOptions::new().write(true).create_new(true).open(p)
        })?;
        Ok(AtomicFile { dest, file, temp })
    }

    /// The path the file will be renamed to (a symbolic link given to
    /// [`create`](Self::create) is resolved to its target).
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// Syncs the temporary file, renames it over the destination (checked again: it must
    /// still be absent or a regular file) and syncs the folder.
    ///
    /// On error the temporary file is removed and the destination is untouched, except when
    /// only the final folder sync fails: the new file is then in place but its durability
    /// across a power loss is unknown.
    pub fn commit(self) -> Result<(), FileError> {
        let AtomicFile { dest, file, temp } = self;
        file.sync_all()
            .map_err(io_error("sync temporary file", temp.path()))?;
        drop(file);
        temp.persist_to(&dest)
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Makes a rename durable (a no-op where folders cannot be opened).
fn sync_dir(dir: &Path) -> Result<(), FileError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `dest` atomically with an [`AtomicFile`].
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let mut file = AtomicFile::create(dest)?;
    let tmp = file.temp_path().to_owned();
    file.write_all(bytes)
        .map_err(io_error("write temporary file", &tmp))?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        write_atomic(&dest, b"first").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"first");
        write_atomic(&dest, b"second, longer").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"second, longer");
        assert_eq!(entries(dir.path()), ["out.bin"]);
    }

    #[test]
    fn an_uncommitted_file_is_removed_and_the_destination_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("keep.bin");
        fs::write(&dest, b"original").unwrap();
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"partial").unwrap();
        let tmp = f.temp_path().to_owned();
        assert_eq!(tmp.parent(), Some(dir.path()));
        assert_eq!(fs::read(&tmp).unwrap(), b"partial");
        drop(f);
        assert!(!tmp.exists());
        assert_eq!(fs::read(&dest).unwrap(), b"original");
        assert_eq!(entries(dir.path()), ["keep.bin"]);
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("d");
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"x").unwrap();
        // The destination turns into a non-empty directory before the commit.
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("inside"), b"y").unwrap();
        let e = f.commit().unwrap_err();
        assert!(
            matches!(
                e,
                FileError::NotRegular {
                    kind: "a directory",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(entries(dir.path()), ["d"]);
        assert_eq!(fs::read(dest.join("inside")).unwrap(), b"y");
    }

    #[test]
    fn output_checks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"1").unwrap();
        assert_eq!(check_output(&file).unwrap(), file);
        let absent = dir.path().join("absent");
        assert_eq!(check_output(&absent).unwrap(), absent);
        let e = check_output(dir.path()).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::NotRegular {
                    kind: "a directory",
                    ..
                }
            ),
            "{e}"
        );
        #[cfg(unix)]
        {
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&file, &link).unwrap();
            assert_eq!(check_output(&link).unwrap(), file.canonicalize().unwrap());
            let dangling = dir.path().join("dangling");
            std::os::unix::fs::symlink(dir.path().join("nothing"), &dangling).unwrap();
            assert!(matches!(
                check_output(&dangling),
                Err(FileError::DanglingSymlink { .. })
            ));
            let null = dir.path().join("null");
            std::os::unix::fs::symlink("/dev/null", &null).unwrap();
            assert!(matches!(
                check_output(&null),
                Err(FileError::NotRegular {
                    kind: "a character device",
                    ..
                })
            ));
        }
    }

    #[test]
    fn same_file_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, b"1").unwrap();
        fs::write(&b, b"1").unwrap();
        check_not_input(&a, [b.as_path()]).unwrap();
        check_not_input(&dir.path().join("new"), [a.as_path()]).unwrap();
        let dotted = dir.path().join(".").join("a");
        let e = check_not_input(&dotted, [b.as_path(), a.as_path()]).unwrap_err();
        assert!(
            matches!(e, FileError::OutputIsInput { ref input, .. } if input == &a),
            "{e}"
        );
        let hard = dir.path().join("hard");
        fs::hard_link(&a, &hard).unwrap();
        assert!(check_not_input(&hard, [a.as_path()]).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn open_regular_refuses_a_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::NotRegular {
                    kind: "a FIFO (named pipe)",
                    ..
                }
            ),
            "{e}"
        );
        let e = open_regular(dir.path()).unwrap_err();
        assert!(matches!(e, FileError::NotRegular { .. }), "{e}");
        let file = dir.path().join("f");
        fs::write(&file, b"abc").unwrap();
        assert_eq!(read_regular(&file).unwrap(), b"abc");
    }
}
