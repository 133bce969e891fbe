//! The one integration-test binary of the C ABI: the header is current, misuse is caught (Rust
//! calling the entry points directly, and a C program misusing them from 8 threads), a C program
//! built with `cc` against libtaskpack.a runs every demo task, text classification gives the text
//! family's goldens, and the C programs run clean under valgrind's memcheck.

mod c_demo;
mod c_misuse;
mod common;
mod header;
mod misuse;
mod soak;
mod text;
mod valgrind;
