//! Errors of the runtime.

use std::path::PathBuf;

use crate::format::FormatError;

/// Everything that can go wrong opening a bundle or running a task.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bundle file could not be opened, mapped or read.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// `open`, `map` or `read`.
        action: &'static str,
        /// The bundle path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bundle breaks a rule of the format (docs/FORMAT.md).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// No task of that name in the bundle.
    #[error("no task {name:?} in the bundle (tasks: {known})")]
    UnknownTask {
        /// The requested name.
        name: String,
        /// The bundle's task names, comma-separated.
        known: String,
    },
    /// A task or tensor index out of range.
    #[error("{what} index {index} out of range (the bundle has {count})")]
    OutOfRange {
        /// `task` or `tensor`.
        what: &'static str,
        /// The index given.
        index: usize,
        /// How many there are.
        count: usize,
    },
}
