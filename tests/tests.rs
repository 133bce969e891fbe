//! The one integration-test binary (ripgrep style): each module covers one part.

mod compile;
mod format;
mod readers;
mod runtime;
