//! The one integration-test binary of the C ABI: the header is current, misuse is caught (Rust
//! calling the entry points directly), a C program built with `cc` against libtaskpack.a runs
//! every demo task, and text classification gives the text family's goldens.

mod c_demo;
mod common;
mod header;
mod misuse;
mod text;
