//! The one integration-test binary (ripgrep style): each module covers one part.

mod calibrate;
mod common;
mod compile;
mod compute;
mod format;
mod hostile_graphs;
mod hostile_inputs;
mod readers;
mod runtime;
mod safety_io;
mod text;
