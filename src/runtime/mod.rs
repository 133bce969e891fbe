//! The on-device half: open a bundle and reconstruct any task's weights.
//!
//! Built without any compiler dependency: an app links this (and the C ABI) only.

mod bundle;
mod error;
pub mod reconstruct;

pub use bundle::Bundle;
pub use error::Error;
