//! The ONNX helpers of `src/onnx/`: `scan_model` (how the compiler reads a checkpoint without
//! copying its weights), `read_typed_f32`, `decode_model`, `float_initializers`,
//! `strip_float_initializers`, `batchnorm_statistics` and `restore_initializers`.
//!
//! Besides "no panic", it checks the scanner against prost's full decode whenever both accept
//! the bytes: the same weights (names, types, shapes, values bit for bit) and the same stripped
//! graph (the documented invariant of `strip_float_initializers`); and that restoring the
//! scanned weights into the stripped graph gives back the same weights.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskpack::format::DType;
use taskpack::internals::{
    batchnorm_statistics, decode_model, float_initializers, read_typed_f32, restore_initializers,
    scan_model, strip_float_initializers, TensorBytes, TensorProto, WeightData,
};

/// The weight's values as little-endian bytes of its dtype, from prost's decode.
fn decoded_bytes(t: &TensorProto, dtype: DType) -> Vec<u8> {
    if !t.raw_data.is_empty() {
        return t.raw_data.clone();
    }
    match dtype {
        DType::F32 => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 | DType::BF16 => t
            .int32_data
            .iter()
            .flat_map(|v| (*v as u16).to_le_bytes())
            .collect(),
    }
}

/// Equal as values of `dtype`, every NaN equal to every NaN (a half NaN read through `f32` may
/// come back with another payload).
fn same_values(dtype: DType, a: &[u8], b: &[u8]) -> bool {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    dtype.decode_into(a, &mut x);
    dtype.decode_into(b, &mut y);
    a.len() == b.len()
        && x.iter()
            .zip(&y)
            .all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()))
}

fuzz_target!(|data: &[u8]| {
    let scanned = scan_model(data);
    let decoded = decode_model(data);
    if let Ok(model) = &decoded {
        let _ = float_initializers(model);
        let _ = batchnorm_statistics(model);
        let _ = restore_initializers(&strip_float_initializers(model), Vec::new());
    }
    let Ok(scanned) = scanned else {
        return;
    };
    // Every weight the scanner reports can be read: its values as little-endian bytes of its
    // dtype (`None` for external data).
    let mut weights = Vec::new();
    for w in &scanned.weights {
        let bytes: Option<Vec<u8>> = match &w.data {
            WeightData::Raw(r) => Some(data.get(r.clone()).expect("raw range in bounds").to_vec()),
            WeightData::Typed(r) => {
                let mut out = Vec::new();
                read_typed_f32(data, r.clone(), w.info.dtype, &mut out)
                    .expect("typed weight reads");
                assert_eq!(Some(out.len()), w.info.numel(), "{}", w.info.name);
                let mut bytes = Vec::new();
                w.info.dtype.encode(&out, &mut bytes);
                Some(bytes)
            }
            WeightData::Empty => Some(Vec::new()),
            WeightData::External(_) => None,
        };
        weights.push(bytes);
    }
    let stripped = strip_float_initializers(&scanned.skeleton);
    let _ = batchnorm_statistics(&scanned.skeleton);

    // Differential: prost's full decode agrees with the scan.
    if let Ok(model) = &decoded {
        if let Ok(infos) = float_initializers(model) {
            let scanned_infos: Vec<_> = scanned.weights.iter().map(|w| w.info.clone()).collect();
            assert_eq!(
                infos, scanned_infos,
                "weights differ between scan and decode"
            );
            assert_eq!(
                strip_float_initializers(model),
                stripped,
                "stripped graphs differ between scan and decode"
            );
            let tensors = model
                .graph
                .iter()
                .flat_map(|g| g.initializer.iter())
                .filter(|t| taskpack::internals::dtype_from_onnx(t.data_type).is_some());
            for ((t, w), bytes) in tensors.zip(&scanned.weights).zip(&weights) {
                if let (Some(bytes), false) = (bytes, w.info.numel() == Some(0)) {
                    assert!(
                        same_values(w.info.dtype, &decoded_bytes(t, w.info.dtype), bytes),
                        "values of {} differ",
                        w.info.name
                    );
                }
            }
        }
    }

    // Round trip: the scanned weights restored into the stripped graph.
    if weights.iter().all(Option::is_some) {
        let tensors: Vec<TensorBytes> = scanned
            .weights
            .iter()
            .zip(weights)
            .map(|(w, data)| TensorBytes {
                name: w.info.name.clone(),
                dtype: w.info.dtype,
                shape: w.info.shape.clone(),
                data: data.unwrap_or_default(),
            })
            .collect();
        if let Ok(restored) = restore_initializers(&stripped, tensors.clone()) {
            let again = scan_model(&restored).expect("a restored model scans");
            assert_eq!(again.weights.len(), tensors.len());
            for (w, t) in again.weights.iter().zip(&tensors) {
                assert_eq!(
                    (&w.info.name, w.info.dtype, &w.info.shape),
                    (&t.name, t.dtype, &t.shape)
                );
                if let WeightData::Raw(r) = &w.data {
                    assert_eq!(restored.get(r.clone()), Some(t.data.as_slice()));
                }
            }
        }
    }
});
