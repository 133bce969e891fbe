//! The one integration-test binary (ripgrep style): each module covers one part.

mod common;
mod compile;
mod format;
mod readers;
mod runtime;
