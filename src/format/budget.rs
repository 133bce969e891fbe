//! The memory budget of manifest decoding (docs/FORMAT.md rule 35 and §7).
//!
//! postcard is not self-describing: a sequence is a length prefix followed by its elements, and
//! an element may take one byte on the wire (an empty string, a task tensor without delta) but
//! 24 or 32 bytes in memory. Without a budget a 64 MiB manifest of such elements decodes to
//! gigabytes (serde's `Vec` also grows by doubling past its 1 MiB pre-allocation). So every
//! `Vec` of the manifest types is decoded by [`seq`] (`#[serde(deserialize_with)]`), which
//! charges the buffer it is about to allocate — length prefix × in-memory element size, or each
//! growth step when the prefix claims more elements than bytes remain — against a per-thread
//! budget *before* allocating, and allocates exactly that. [`with_budget`] sets the budget for
//! one decode: [`MANIFEST_DECODE_FACTOR`](super::layout::MANIFEST_DECODE_FACTOR) bytes per
//! manifest byte. Strings need no charge: each is copied from the manifest with its exact length,
//! so all of them together take at most the manifest's length.
//!
//! Outside [`with_budget`] (a caller decoding a manifest with postcard directly) nothing is
//! charged and [`seq`] behaves like serde's own `Vec` decoding, with exact allocation.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

thread_local! {
    /// Bytes the current decode may still allocate for sequences; `None` outside a budget.
    static LEFT: Cell<Option<u64>> = const { Cell::new(None) };
    /// Set when a charge was refused during the current budget.
    static EXCEEDED: Cell<bool> = const { Cell::new(false) };
}

/// Restores the enclosing budget (none, normally) even if decoding panics.
struct Restore(Option<u64>);

impl Drop for Restore {
    fn drop(&mut self) {
        LEFT.with(|l| l.set(self.0));
    }
}

/// Runs `decode` (on this thread) with `bytes` of sequence buffers allowed; returns its result
/// and whether it was stopped by the budget.
pub(crate) fn with_budget<T>(bytes: u64, decode: impl FnOnce() -> T) -> (T, bool) {
    let _restore = Restore(LEFT.with(|l| l.replace(Some(bytes))));
    let outer = EXCEEDED.with(|e| e.replace(false));
    let out = decode();
    let exceeded = EXCEEDED.with(|e| e.replace(outer));
    (out, exceeded)
}

/// Takes `bytes` from the budget; `false` (and the budget marked exceeded) if there is not
/// that much left.
fn charge(bytes: u64) -> bool {
    LEFT.with(|l| match l.get() {
        None => true,
        Some(left) => match left.checked_sub(bytes) {
            Some(rest) => {
                l.set(Some(rest));
                true
            }
            None => {
                EXCEEDED.with(|e| e.set(true));
                false
            }
        },
    })
}

/// Grows `v`'s buffer by exactly `additional` elements, charged first.
fn grow<T, E: serde::de::Error>(v: &mut Vec<T>, additional: usize) -> Result<(), E> {
    let bytes = (additional as u64).saturating_mul(std::mem::size_of::<T>() as u64);
    if !charge(bytes) {
        return Err(E::custom("the manifest's memory budget is exhausted"));
    }
    v.try_reserve_exact(additional)
        .map_err(|_| E::custom("out of memory decoding the manifest"))
}

/// Decodes a `Vec<T>` charging its buffer to the budget before allocating it (module docs).
pub(crate) fn seq<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct SeqVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::new();
            // postcard gives the exact length when that many bytes remain, else no hint (the
            // prefix lies: decoding will fail before the elements run out).
            if let Some(n) = access.size_hint() {
                grow(&mut v, n)?;
            }
            while let Some(x) = access.next_element()? {
                if v.len() == v.capacity() {
                    let additional = v.capacity().max(4);
                    grow::<T, A::Error>(&mut v, additional)?;
                }
                v.push(x);
            }
            Ok(v)
        }
    }

    deserializer.deserialize_seq(SeqVisitor(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Vec<u32>, postcard::Error> {
        #[derive(serde::Deserialize)]
        struct W(#[serde(deserialize_with = "seq")] Vec<u32>);
        postcard::from_bytes::<W>(bytes).map(|w| w.0)
    }

    #[test]
    fn charges_the_buffer_before_allocating_it() {
        let bytes = postcard::to_stdvec(&vec![7u32; 10]).unwrap();
        // 10 u32s need 40 bytes of buffer.
        let (ok, exceeded) = with_budget(40, || decode(&bytes));
        assert_eq!(ok.unwrap(), vec![7; 10]);
        assert!(!exceeded);
        let (err, exceeded) = with_budget(39, || decode(&bytes));
        assert!(err.is_err());
        assert!(exceeded);
        // The budget ends with `with_budget`: unlimited again.
        assert_eq!(decode(&bytes).unwrap().len(), 10);
    }

    #[test]
    fn a_lying_length_prefix_is_charged_as_it_grows() {
        // Claims 1000 elements, has 3: no hint, growth 4 at a time, then the end of input.
        let mut bytes = postcard::to_stdvec(&1000u64).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        let (err, exceeded) = with_budget(16, || decode(&bytes));
        assert!(matches!(
            err,
            Err(postcard::Error::DeserializeUnexpectedEnd)
        ));
        assert!(!exceeded);
        let (err, exceeded) = with_budget(15, || decode(&bytes));
        assert!(err.is_err());
        assert!(exceeded);
    }
}
