//! Reconstruction of a task's weights from a bundle: `θ̂_t = θ_0 + g_t · s_t ⊙ (m_t ⊙ δ)`.
//!
//! [`task_tensor`] is the one implementation of the normative rule of docs/FORMAT.md
//! ("Reconstruction"), written to be read against the spec: arithmetic is `f32`, base and delta
//! decoded to `f32` first, the factor `g · s` formed before it multiplies `δ`, and no fused
//! multiply-add. The exporter calls it. The runtime calls [`task_tensor_into`], the same
//! operations on the same values in one pass per chunk of the tensor, straight into the caller's
//! buffer, tested bit for bit against [`task_tensor`]; so an exported ONNX model and the runtime's
//! bound weights are bit-identical.

use crate::encoding::{Encoding, Q2_BLOCK, Q3_BLOCK, Q4_BLOCK, Q8_BLOCK, TERNARY_BLOCK};
use crate::format::manifest::{
    Manifest, Scale, Stored, TaskEntry, TaskTensor, TensorEntry, TensorStorage,
};
use crate::format::{layout, FormatError, SectionId};
use crate::runtime::{Bundle, Error};

/// Buffers [`task_tensor`] decodes the delta and the row scales into, reused so that
/// reconstructing many tensors allocates once.
#[derive(Debug, Default)]
pub struct DecodeBuffers {
    delta: Vec<f32>,
    rows: Vec<f32>,
}

/// Reconstructs tensor `tensor` of task `task` into `out` (cleared first) and returns its shape.
/// Every section read is checksum-verified on first use.
pub fn task_tensor(
    bundle: &Bundle,
    task: usize,
    tensor: usize,
    out: &mut Vec<f32>,
    buffers: &mut DecodeBuffers,
) -> Result<Vec<u64>, Error> {
    let (t, entry, module) = lookup(bundle, task, tensor)?;
    match (module, &entry.storage) {
        (TaskTensor::Private { stored, shape }, _) => {
            bundle.decode_f32(stored.section, out)?;
            Ok(shape.clone())
        }
        (module, TensorStorage::Merged { base, delta }) => {
            let Some((mask, scale, residual)) = module.merged_parts() else {
                return Err(mismatch(t, entry));
            };
            bundle.decode_f32(base.section, out)?;
            if let Some(delta) = delta {
                merged(bundle, t, (delta, mask, scale), out, buffers)?;
            }
            if let Some(r) = residual {
                bundle.decode_f32(r.section, &mut buffers.delta)?;
                // Validated: the residual has the tensor's elements (rule 26).
                for (o, r) in out.iter_mut().zip(&buffers.delta) {
                    *o += r;
                }
            }
            Ok(entry.shape.clone())
        }
        // Unreachable after validation (rule 28); treated as the base alone would be wrong.
        (_, TensorStorage::Private) => Err(mismatch(t, entry)),
    }
}

/// `out = θ_0 + g · s ⊙ (m ⊙ δ)` with `out` holding `θ_0`: §5's merged rule.
fn merged(
    bundle: &Bundle,
    t: &TaskEntry,
    (delta, mask, scale): (&Stored, Option<SectionId>, Scale),
    out: &mut [f32],
    buffers: &mut DecodeBuffers,
) -> Result<(), Error> {
    bundle.decode_f32(delta.section, &mut buffers.delta)?;
    let mask = match mask {
        Some(id) => {
            let bits = bundle.section(id)?;
            // Validated by `parse` (rule 26) and, on first use, `verify_section` (pad bits).
            if bits.len() != layout::mask_len(out.len()) {
                return Err(crate::format::FormatError::MaskPadBits { section: id }.into());
            }
            Some(bits)
        }
        None => None,
    };
    let g = t.global_scale;
    match scale {
        Scale::None => apply(out, &buffers.delta, mask, |_| g),
        Scale::Tensor(s) => {
            let gs = g * s;
            apply(out, &buffers.delta, mask, |_| gs)
        }
        Scale::Rows(id) => {
            bundle.decode_f32(id, &mut buffers.rows)?;
            // Validated: rows × row length == elements, rows ≥ 1.
            let row_len = out
                .len()
                .checked_div(buffers.rows.len())
                .unwrap_or(0)
                .max(1);
            let rows = &buffers.rows;
            apply(out, &buffers.delta, mask, |i| {
                rows.get(i / row_len).map_or(0.0, |s| g * s)
            })
        }
    }
    Ok(())
}

/// Whether every task reconstructs tensor `tensor` to the same values, known from the manifest
/// alone: a merged tensor without delta, or one whose delta every task applies without a mask
/// and with the same factor `g · s` (bit for bit; `Scale::None` or `Scale::Tensor`). The
/// runtime then binds it once per graph, as part of the template, instead of at every switch.
/// Row scales are not compared (they would have to be read): such tensors count as per task.
pub(crate) fn same_for_every_task(manifest: &Manifest, tensor: usize) -> bool {
    match manifest.tensors.get(tensor).map(|t| &t.storage) {
        Some(TensorStorage::Merged { delta: None, .. }) => is_constant(manifest, tensor),
        Some(TensorStorage::Merged { delta: Some(_), .. }) => {
            let mut factors = manifest.tasks.iter().map(|t| match t.tensors.get(tensor) {
                Some(TaskTensor::Merged {
                    mask: None,
                    scale: Scale::None,
                }) => Some(t.global_scale.to_bits()),
                Some(TaskTensor::Merged {
                    mask: None,
                    scale: Scale::Tensor(s),
                }) => Some((t.global_scale * s).to_bits()),
                _ => None,
            });
            let first = factors.next().flatten();
            first.is_some() && factors.all(|f| f == first)
        }
        Some(TensorStorage::Private) | None => false,
    }
}

/// Whether tensor `tensor` is the base for every task: merged, without a delta, and no task
/// has a residual for it. The template holds such a tensor as a constant.
pub(crate) fn is_constant(manifest: &Manifest, tensor: usize) -> bool {
    matches!(
        manifest.tensors.get(tensor).map(|t| &t.storage),
        Some(TensorStorage::Merged { delta: None, .. })
    ) && manifest.tasks.iter().all(|t| {
        !matches!(
            t.tensors.get(tensor),
            Some(TaskTensor::Residual { .. }) | None
        )
    })
}

/// Task `task`, tensor `tensor` and the task's module for it.
fn lookup(
    bundle: &Bundle,
    task: usize,
    tensor: usize,
) -> Result<(&TaskEntry, &TensorEntry, &TaskTensor), Error> {
    let manifest = bundle.manifest();
    let t = manifest.tasks.get(task).ok_or(Error::OutOfRange {
        what: "task",
        index: task,
        count: manifest.tasks.len(),
    })?;
    let out_of_range = || Error::OutOfRange {
        what: "tensor",
        index: tensor,
        count: manifest.tensors.len(),
    };
    let entry = manifest.tensors.get(tensor).ok_or_else(out_of_range)?;
    // Validated by `parse` (rules 27–29): one module per tensor, of the matching variant.
    let module = t.tensors.get(tensor).ok_or_else(out_of_range)?;
    Ok((t, entry, module))
}

fn mismatch(t: &TaskEntry, entry: &TensorEntry) -> Error {
    Error::Format(FormatError::TaskTensorMismatch {
        task: t.name.clone(),
        tensor: entry.name.clone(),
        expected: "private",
        found: "merged",
    })
}

/// Elements per step of [`task_tensor_into`]: one chunk of the output, of the decoded delta and
/// of the factors (12 KiB together) stays in L1 cache from decoding to the masked add. A whole
/// number of blocks of every encoding, so each chunk decodes on its own.
const CHUNK: usize = 1024;
const _: () = assert!(
    CHUNK.is_multiple_of(Q8_BLOCK)
        && CHUNK.is_multiple_of(Q4_BLOCK)
        && CHUNK.is_multiple_of(Q3_BLOCK)
        && CHUNK.is_multiple_of(Q2_BLOCK)
        && CHUNK.is_multiple_of(TERNARY_BLOCK)
);

/// Reconstructs tensor `tensor` of task `task` straight into `out`, which must hold exactly its
/// number of elements (else an error, and `out` is left as it was): bit for bit what
/// [`task_tensor`] produces, without its decode buffers and passes over whole tensors. Chunk by
/// chunk, the delta is decoded into a buffer on the stack, and the masked, scaled add reads the
/// base (an `f32` base straight from the bundle) and writes `out` while the chunk is in L1, mask
/// bits selecting without branches. Every section read is checksum-verified on first use.
pub(crate) fn task_tensor_into(
    bundle: &Bundle,
    task: usize,
    tensor: usize,
    out: &mut [f32],
) -> Result<(), Error> {
    let (t, entry, module) = lookup(bundle, task, tensor)?;
    let len = out.len();
    match (module, &entry.storage) {
        (TaskTensor::Private { stored, .. }, _) => {
            stored
                .encoding
                .decode_slice(dense(bundle, *stored, len)?, out);
            Ok(())
        }
        (module, TensorStorage::Merged { base, delta }) => {
            let Some((mask, scale, residual)) = module.merged_parts() else {
                return Err(mismatch(t, entry));
            };
            // Every length is checked before `out` is written.
            let base_bytes = dense(bundle, *base, len)?;
            let residual = match residual {
                Some(r) => Some((r.encoding, dense(bundle, r, len)?)),
                None => None,
            };
            match delta {
                Some(delta) => {
                    let delta_bytes = dense(bundle, *delta, len)?;
                    let mask = match mask {
                        Some(id) => Some(sized(bundle, id, layout::mask_len(len))?),
                        None => None,
                    };
                    let factor = factor(bundle, t, entry, scale, len)?;
                    fused(
                        out,
                        (base.encoding, base_bytes),
                        (delta.encoding, delta_bytes),
                        mask,
                        &factor,
                    );
                }
                // tvq's case: base and residual in one pass.
                None => match residual {
                    Some(residual) => {
                        base_plus_residual(out, (base.encoding, base_bytes), residual);
                        return Ok(());
                    }
                    None => base.encoding.decode_slice(base_bytes, out),
                },
            }
            if let Some(residual) = residual {
                add_residual(out, residual);
            }
            Ok(())
        }
        (_, TensorStorage::Private) => Err(mismatch(t, entry)),
    }
}

/// The factor `g · s_r` of task `t`'s merged module with scale `scale` for a tensor of `len`
/// elements, with a row-scale section's length checked.
fn factor<'a>(
    bundle: &'a Bundle,
    t: &TaskEntry,
    entry: &TensorEntry,
    scale: Scale,
    len: usize,
) -> Result<Factor<'a>, Error> {
    let g = t.global_scale;
    Ok(match scale {
        Scale::None => Factor::Uniform(g),
        Scale::Tensor(s) => Factor::Uniform(g * s),
        Scale::Rows(id) => {
            let scales = bundle.section(id)?;
            // Validated (rule 26): one scale per row, rows along the first axis.
            let row_len = match layout::row_scale_count(scales.len()) {
                Some(0) => (len == 0).then_some(1),
                Some(rows) => len.is_multiple_of(rows).then(|| (len / rows).max(1)),
                None => None,
            };
            let Some(row_len) = row_len else {
                let expected = layout::rows(&entry.shape)
                    .and_then(|r| layout::row_scale_bytes(r).ok())
                    .unwrap_or(0);
                return Err(length_error(id, expected, scales.len()));
            };
            Factor::Rows { g, scales, row_len }
        }
    })
}

/// Bytes of [`CHUNK`] elements in `encoding` (whole blocks); cannot fail for so few elements.
fn chunk_bytes(encoding: Encoding) -> usize {
    layout::encoded_bytes(CHUNK as u64, encoding)
        .ok()
        .and_then(|b| layout::to_usize(b).ok())
        .unwrap_or(usize::MAX)
}

/// `out[i] += r[i]`, the residual decoded chunk by chunk into a buffer on the stack; `bytes`
/// holds `out.len()` elements (checked by the caller).
fn add_residual(out: &mut [f32], (encoding, bytes): (Encoding, &[u8])) {
    let mut r = [0f32; CHUNK];
    for (o, b) in out
        .chunks_mut(CHUNK)
        .zip(bytes.chunks(chunk_bytes(encoding)))
    {
        let Some(r) = r.get_mut(..o.len()) else {
            return;
        };
        encoding.decode_slice(b, r);
        for (o, r) in o.iter_mut().zip(r.iter()) {
            *o += r;
        }
    }
}

/// `out = θ_0 + r` chunk by chunk, while each chunk is in L1: the decoded base, then the
/// residual decoded into a buffer on the stack and added — what [`add_residual`] after decoding
/// the whole base gives, in one pass over `out` instead of two. Lengths checked by the caller.
fn base_plus_residual(out: &mut [f32], base: (Encoding, &[u8]), residual: (Encoding, &[u8])) {
    let mut r = [0f32; CHUNK];
    let chunks = out
        .chunks_mut(CHUNK)
        .zip(base.1.chunks(chunk_bytes(base.0)))
        .zip(residual.1.chunks(chunk_bytes(residual.0)));
    for ((o, b), rb) in chunks {
        let Some(r) = r.get_mut(..o.len()) else {
            return;
        };
        base.0.decode_slice(b, o);
        residual.0.decode_slice(rb, r);
        for (o, r) in o.iter_mut().zip(r.iter()) {
            *o += r;
        }
    }
}

fn length_error(section: SectionId, expected: u64, found: usize) -> Error {
    Error::Format(FormatError::SectionLengthMismatch {
        section,
        expected,
        found: found as u64,
    })
}

/// The bytes of section `id`, which must be `bytes` long.
fn sized(bundle: &Bundle, id: SectionId, bytes: usize) -> Result<&[u8], Error> {
    let data = bundle.section(id)?;
    if data.len() == bytes {
        Ok(data)
    } else {
        Err(length_error(id, bytes as u64, data.len()))
    }
}

/// The bytes of a dense section of `len` elements.
fn dense(bundle: &Bundle, stored: Stored, len: usize) -> Result<&[u8], Error> {
    let bytes = layout::encoded_bytes(len as u64, stored.encoding)?;
    sized(bundle, stored.section, layout::to_usize(bytes)?)
}

/// The factor `g · s_r` of every element.
enum Factor<'a> {
    /// The same for every element: `g` or `g · s`.
    Uniform(f32),
    /// `g · s_r` for the row `r` of each element, rows of `row_len` elements, `s_r` the `f32`
    /// at byte `4 r` of `scales`.
    Rows {
        g: f32,
        scales: &'a [u8],
        row_len: usize,
    },
}

/// `out = base + factor · δ` where the mask selects, `base` elsewhere, chunk by chunk. The
/// lengths were checked by the caller: `base`, `delta` hold `out.len()` elements, `mask` (if any)
/// `⌈out.len() / 8⌉` bytes.
fn fused(
    out: &mut [f32],
    base: (Encoding, &[u8]),
    delta: (Encoding, &[u8]),
    mask: Option<&[u8]>,
    factor: &Factor<'_>,
) {
    let mut d = [0f32; CHUNK];
    let mut f = [0f32; CHUNK];
    let mut masks = mask.map(|m| m.chunks(CHUNK / 8));
    let f32_base = base.0 == Encoding::F32;
    let chunks = out
        .chunks_mut(CHUNK)
        .zip(base.1.chunks(chunk_bytes(base.0)))
        .zip(delta.1.chunks(chunk_bytes(delta.0)));
    for (c, ((o, b), dl)) in chunks.enumerate() {
        let n = o.len();
        let Some(d) = d.get_mut(..n) else { return };
        delta.0.decode_slice(dl, d);
        let m = masks.as_mut().and_then(Iterator::next);
        if !f32_base {
            base.0.decode_slice(b, o);
        }
        match *factor {
            Factor::Uniform(x) if f32_base => combine_f32(o, b, d, m, |_| x),
            Factor::Uniform(x) => combine(o, d, m, |_| x),
            Factor::Rows { g, scales, row_len } => {
                let Some(f) = f.get_mut(..n) else { return };
                row_factors(c * CHUNK, row_len, g, scales, f);
                let factor = |j: usize| f.get(j).copied().unwrap_or(0.0);
                if f32_base {
                    combine_f32(o, b, d, m, factor);
                } else {
                    combine(o, d, m, factor);
                }
            }
        }
    }
}

/// `f[j] = g · s_r` for element `start + j` of row `r`.
fn row_factors(start: usize, row_len: usize, g: f32, scales: &[u8], f: &mut [f32]) {
    let mut j = 0;
    while j < f.len() {
        let i = start + j;
        let row = i / row_len;
        let end = ((row + 1) * row_len - start).min(f.len());
        let s = scales
            .get(4 * row..4 * row + 4)
            .map_or(0.0, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if let Some(run) = f.get_mut(j..end) {
            run.fill(g * s);
        }
        j = end;
    }
}

/// `o[j] = base[j] + factor(j) · d[j]` where bit `j` of `mask` is set (all, without a mask),
/// `base[j]` elsewhere, `base` the little-endian `f32` bytes of the chunk: [`combine`] with the
/// base read straight from the bundle, saving a pass that copies it into `o` first.
#[inline(always)]
fn combine_f32(
    o: &mut [f32],
    base: &[u8],
    d: &[f32],
    mask: Option<&[u8]>,
    factor: impl Fn(usize) -> f32,
) {
    let le = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    let Some(mask) = mask else {
        for (j, ((o, b), d)) in o.iter_mut().zip(base.chunks_exact(4)).zip(d).enumerate() {
            *o = le(b) + factor(j) * d;
        }
        return;
    };
    let mut o8 = o.chunks_exact_mut(8);
    let mut b8 = base.chunks_exact(32);
    let mut d8 = d.chunks_exact(8);
    let mut k = 0;
    for (((o, b), d), &bits) in (&mut o8).zip(&mut b8).zip(&mut d8).zip(mask) {
        let (Ok(o), Ok(b), Ok(d)) = (
            <&mut [f32; 8]>::try_from(o),
            <&[u8; 32]>::try_from(b),
            <&[f32; 8]>::try_from(d),
        ) else {
            continue;
        };
        for j in 0..8 {
            let b = f32::from_le_bytes([b[4 * j], b[4 * j + 1], b[4 * j + 2], b[4 * j + 3]]);
            let sum = b + factor(8 * k + j) * d[j];
            o[j] = if bits & (1 << j) != 0 { sum } else { b };
        }
        k += 1;
    }
    let bits = mask.get(k).copied().unwrap_or(0);
    let tail = o8
        .into_remainder()
        .iter_mut()
        .zip(b8.remainder().chunks_exact(4));
    for (j, ((o, b), d)) in tail.zip(d8.remainder()).enumerate() {
        let b = le(b);
        *o = if bits & (1 << j) != 0 {
            b + factor(8 * k + j) * d
        } else {
            b
        };
    }
}

/// `o[j] += factor(j) · d[j]` where bit `j` of `mask` is set (all, without a mask).
///
/// The masked loop computes the sum for all eight elements of a mask byte and keeps it or the
/// old value by the bit: a select, not a branch, so random masks cost no mispredictions and the
/// loop vectorizes. The values are those of `apply`: the same `f32` product and sum.
#[inline(always)]
fn combine(o: &mut [f32], d: &[f32], mask: Option<&[u8]>, factor: impl Fn(usize) -> f32) {
    let Some(mask) = mask else {
        for (j, (o, d)) in o.iter_mut().zip(d).enumerate() {
            *o += factor(j) * d;
        }
        return;
    };
    let mut o8 = o.chunks_exact_mut(8);
    let mut d8 = d.chunks_exact(8);
    let mut k = 0;
    for ((o, d), &bits) in (&mut o8).zip(&mut d8).zip(mask) {
        for (j, (o, d)) in o.iter_mut().zip(d).enumerate() {
            let sum = *o + factor(8 * k + j) * d;
            *o = if bits & (1 << j) != 0 { sum } else { *o };
        }
        k += 1;
    }
    let bits = mask.get(k).copied().unwrap_or(0);
    for (j, (o, d)) in o8
        .into_remainder()
        .iter_mut()
        .zip(d8.remainder())
        .enumerate()
    {
        if bits & (1 << j) != 0 {
            *o += factor(8 * k + j) * d;
        }
    }
}

/// `out[i] += factor(i) · δ[i]` where the mask selects `i`.
///
/// `mask` is the packed mask (bit `i % 8` of byte `i / 8`, docs/FORMAT.md). It is walked a byte
/// at a time: an empty byte skips eight elements, a full one runs a branch-free inner loop.
fn apply(out: &mut [f32], delta: &[f32], mask: Option<&[u8]>, factor: impl Fn(usize) -> f32) {
    let Some(mask) = mask else {
        for (i, (o, d)) in out.iter_mut().zip(delta).enumerate() {
            *o += factor(i) * d;
        }
        return;
    };
    let blocks = out.chunks_mut(8).zip(delta.chunks(8)).zip(mask);
    for (block, ((o8, d8), &bits)) in blocks.enumerate() {
        let first = block * 8;
        match bits {
            0 => {}
            0xff => {
                for (j, (o, d)) in o8.iter_mut().zip(d8).enumerate() {
                    *o += factor(first + j) * d;
                }
            }
            _ => {
                for (j, (o, d)) in o8.iter_mut().zip(d8).enumerate() {
                    if bits >> j & 1 == 1 {
                        *o += factor(first + j) * d;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::Mask;

    /// Deterministic pseudo-random bits (xorshift).
    struct Bits(u64);

    impl Bits {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f32(&mut self) -> f32 {
            // Mostly ordinary weights, with the special values mixed in.
            match self.next() % 16 {
                0 => f32::NAN,
                1 => -0.0,
                2 => f32::INFINITY,
                3 => 1e-40, // subnormal
                4 => 65504.0,
                _ => (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0,
            }
        }
    }

    /// The normative path (`decode_into` + `apply`) next to the fused one on the same bytes.
    #[allow(clippy::too_many_arguments)]
    fn check(
        len: usize,
        base_dt: Encoding,
        delta_dt: Encoding,
        masked: bool,
        rows: Option<usize>,
        g: f32,
        seed: u64,
    ) {
        let mut r = Bits(seed);
        let base: Vec<f32> = (0..len).map(|_| r.f32()).collect();
        let delta: Vec<f32> = (0..len).map(|_| r.f32()).collect();
        let (mut base_bytes, mut delta_bytes) = (Vec::new(), Vec::new());
        base_dt.encode(&base, &mut base_bytes);
        delta_dt.encode(&delta, &mut delta_bytes);
        let mask = masked.then(|| {
            let mask = Mask::from_fn(len, |_| r.next().is_multiple_of(3));
            mask.as_bytes().to_vec()
        });
        let scales: Vec<f32> = (0..rows.unwrap_or(0))
            .map(|_| 0.5 + (r.next() % 100) as f32 / 64.0)
            .collect();
        let mut scale_bytes = Vec::new();
        Encoding::F32.encode(&scales, &mut scale_bytes);

        let mut expected = vec![0.0; len];
        base_dt.decode_slice(&base_bytes, &mut expected);
        let mut d = vec![0.0; len];
        delta_dt.decode_slice(&delta_bytes, &mut d);
        let factor = match rows {
            None => Factor::Uniform(g),
            Some(n) => Factor::Rows {
                g,
                scales: &scale_bytes,
                row_len: (len / n).max(1),
            },
        };
        match rows {
            None => apply(&mut expected, &d, mask.as_deref(), |_| g),
            Some(n) => {
                let row_len = (len / n).max(1);
                apply(&mut expected, &d, mask.as_deref(), |i| {
                    scales.get(i / row_len).map_or(0.0, |s| g * s)
                })
            }
        }

        let mut out = vec![7.0; len];
        fused(
            &mut out,
            (base_dt, &base_bytes),
            (delta_dt, &delta_bytes),
            mask.as_deref(),
            &factor,
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&out),
            bits(&expected),
            "len {len}, {base_dt} base, {delta_dt} delta, masked {masked}, rows {rows:?}"
        );
    }

    #[test]
    fn fused_pass_is_bit_identical_to_the_normative_one() {
        // Lengths around the mask byte, the q4 and q8 blocks, the chunk and the f16 decode
        // buffer.
        let lens = [
            0, 1, 7, 8, 9, 31, 33, 63, 65, 255, 256, 257, 1023, 1024, 1025, 2048, 3001,
        ];
        let dtypes = Encoding::ALL;
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for len in lens {
            for base_dt in dtypes {
                for delta_dt in dtypes {
                    for masked in [false, true] {
                        seed += 1;
                        check(len, base_dt, delta_dt, masked, None, 0.7, seed);
                        check(len, base_dt, delta_dt, masked, None, 1.0, seed);
                    }
                }
            }
        }
    }

    #[test]
    fn fused_row_scales_are_bit_identical_to_the_normative_ones() {
        // Rows shorter than a mask byte, not a multiple of it, and across chunk boundaries.
        for (len, rows) in [
            (12, 4),
            (15, 3),
            (21, 7),
            (3000, 3),
            (3001, 1),
            (2050, 2),
            (4096, 2),
        ] {
            for masked in [false, true] {
                for (base_dt, delta_dt) in [
                    (Encoding::F32, Encoding::F32),
                    (Encoding::F32, Encoding::F16),
                    (Encoding::Q8, Encoding::Q4),
                ] {
                    check(len, base_dt, delta_dt, masked, Some(rows), 0.9, len as u64);
                }
            }
        }
    }

    /// Every tensor of every task of demo bundles compiled with every method, the three scale
    /// modes (one per task) and the three delta types: `task_tensor_into` gives the bits of
    /// `task_tensor`.
    #[cfg(feature = "compiler")]
    #[test]
    fn fast_path_matches_task_tensor_on_the_demo_bundles() {
        use crate::compile::{compile, CompileOptions};
        use crate::format::Method;
        use crate::format::ScaleMode;

        let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
        let tasks: Vec<(String, std::path::PathBuf)> =
            ["digits", "fashion3", "footwear", "mnist", "parity"]
                .iter()
                .map(|t| (t.to_string(), demo.join(format!("{t}.onnx"))))
                .collect();
        let modes = [ScaleMode::None, ScaleMode::Tensor, ScaleMode::Row];
        let dir = tempfile::tempdir().unwrap();
        let mut checked = (0, 0, 0);
        for (k, method) in Method::ALL.into_iter().enumerate() {
            let delta_dtype = [
                Encoding::F16,
                Encoding::F32,
                Encoding::BF16,
                Encoding::Q8,
                Encoding::Q4,
            ][k % 5];
            let out = dir.path().join(format!("{}.tpk", method.name()));
            let defaults = CompileOptions::new(demo.join("base.onnx"), tasks.clone(), method, &out);
            let opts = CompileOptions {
                scale: (0..tasks.len()).map(|t| modes[(t + k) % 3]).collect(),
                delta_dtype,
                // tvq's residuals (q3 by default), and TALL's masks with a q2 residual on top.
                residual_dtype: match method {
                    Method::Tall => Some(Encoding::Q2),
                    _ => defaults.residual_dtype,
                },
                base_dtype: [
                    None,
                    Some(Encoding::BF16),
                    Some(Encoding::F16),
                    Some(Encoding::Q8),
                ][k % 4],
                ..defaults
            };
            drop(compile(&opts, &mut |_| {}).unwrap());
            let bundle = Bundle::read(&out).unwrap();
            let m = bundle.manifest();
            let (mut expected, mut scratch) = (Vec::new(), DecodeBuffers::default());
            for task in 0..m.tasks.len() {
                for tensor in 0..m.tensors.len() {
                    task_tensor(&bundle, task, tensor, &mut expected, &mut scratch).unwrap();
                    let mut out = vec![f32::NAN; expected.len()];
                    task_tensor_into(&bundle, task, tensor, &mut out).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&out),
                        bits(&expected),
                        "{method:?} task {task} tensor {tensor}"
                    );
                    let masked = matches!(
                        m.tasks[task].tensors[tensor].merged_parts(),
                        Some((Some(_), ..))
                    );
                    let residual =
                        matches!(m.tasks[task].tensors[tensor], TaskTensor::Residual { .. });
                    checked.0 += 1;
                    checked.1 += usize::from(masked);
                    checked.2 += usize::from(residual);
                }
            }
            // A wrong length is an error, not a panic or a partial write.
            let mut short = vec![0.0; 3];
            assert!(task_tensor_into(&bundle, 0, 0, &mut short).is_err());
        }
        assert!(checked.1 > 0 && checked.1 < checked.0, "{checked:?}");
        assert!(checked.2 > 0 && checked.2 < checked.0, "{checked:?}");
    }
}
