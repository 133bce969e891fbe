//! The compiler end to end on the embedded demo models: each method's exported task against an
//! expectation computed here from the raw checkpoints (decoded with prost, not with taskpack's
//! reader), ONNX vs safetensors inputs, the golden onnxruntime outputs, and every bad input the
//! CLI must refuse with one clear line and no output file.

use crate::common::{cli, demo, demo_tasks};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use taskpack::compile::{compile, CompileError, CompileOptions};
use taskpack::format::DType;
use taskpack::format::Encoding;
use taskpack::format::Method;
use taskpack::runtime::Bundle;
use tract_onnx::pb::ModelProto;

pub(crate) type Weights = BTreeMap<String, (Vec<i64>, Vec<f32>)>;

/// Float initializers of an ONNX model, decoded straight from the protobuf (f32 only).
pub(crate) fn weights_of(bytes: &[u8]) -> Weights {
    let model = ModelProto::decode(bytes).unwrap();
    let mut out = BTreeMap::new();
    for t in model.graph.unwrap().initializer {
        if t.data_type != 1 {
            continue;
        }
        let values = if t.raw_data.is_empty() {
            t.float_data.clone()
        } else {
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        out.insert(t.name.clone(), (t.dims.clone(), values));
    }
    out
}

fn weights(path: &Path) -> Weights {
    weights_of(&std::fs::read(path).unwrap())
}

fn options(method: Method, tasks: &[(String, PathBuf)], out: &Path) -> CompileOptions {
    CompileOptions {
        delta_dtype: Encoding::F32,
        base_dtype: None,
        auto_private: false,
        ..CompileOptions::new(demo().join("base.onnx"), tasks.to_vec(), method, out)
    }
}

/// Private in the demo family without auto-detection: BatchNorm statistics and shape changes.
fn expected_private(name: &str, task_weights: &[Weights], base: &Weights) -> bool {
    name.contains("running_") || task_weights.iter().any(|w| w[name].0 != base[name].0)
}

fn export(bundle: &Bundle, task: &str) -> Weights {
    weights_of(&taskpack::export::export_task(bundle, task).unwrap())
}

#[test]
fn tall_export_is_base_plus_masked_sum_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tall.tpk");
    let tasks = demo_tasks();
    let opts = options(Method::Tall, &tasks, &out);
    let lambda = opts.params.lambda[0];
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    let base = weights(&demo().join("base.onnx"));
    let thetas: Vec<Weights> = tasks.iter().map(|(_, p)| weights(p)).collect();
    for (t, (name, _)) in tasks.iter().enumerate() {
        let got = export(&bundle, name);
        for (tensor, (dims, b)) in &base {
            let (got_dims, got_values) = &got[tensor];
            if expected_private(tensor, &thetas, &base) {
                assert_eq!(
                    got[tensor], thetas[t][tensor],
                    "{name}/{tensor} is the task's own copy"
                );
                continue;
            }
            assert_eq!(got_dims, dims);
            // τ_MTL = Σ_t τ_t in task order (α = 1); m_t = |τ_t| > λ |τ_MTL − τ_t|.
            for i in 0..b.len() {
                let taus: Vec<f32> = thetas.iter().map(|w| w[tensor].1[i] - b[i]).collect();
                let sum = taus.iter().fold(0.0f32, |acc, x| acc + x);
                let keep = taus[t].abs() > lambda * (sum - taus[t]).abs();
                let expected = if keep { b[i] + sum } else { b[i] };
                assert_eq!(
                    got_values[i].to_bits(),
                    expected.to_bits(),
                    "{name}/{tensor}[{i}]"
                );
            }
        }
    }
}

/// Block quantization as docs/FORMAT.md §3 states it, written out here independently of
/// `src/encoding.rs`: blocks of `block` values, `s = max|x| / q_max`, codes
/// `round(x / s)` ties to even; returns the decoded values `f32(q) · s`.
fn quantized(x: &[f32], block: usize, q_max: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(block) {
        let max = b.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        let s = max / q_max;
        for v in b {
            out.push(if s == 0.0 {
                0.0
            } else {
                // The code is an integer: a negative value that rounds to 0 decodes to +0.
                f32::from((v / s).round_ties_even().clamp(-q_max, q_max) as i8) * s
            });
        }
    }
    out
}

/// What a reader decodes after storing `x` in `e`, per docs/FORMAT.md §3: IEEE rounding by
/// the `half` crate for f16, [`quantized`] for the block codes.
fn stored(e: Encoding, x: &[f32]) -> Vec<f32> {
    match e {
        Encoding::F32 => x.to_vec(),
        Encoding::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        Encoding::Q8 => quantized(x, 64, 127.0),
        Encoding::Q4 => quantized(x, 32, 7.0),
        other => panic!("no reference for {other}"),
    }
}

/// TALL with `base` and `delta` storage on the demo, checked against the rules computed here:
/// the demo's one large matrix (`fc.weight`, 32 × 784) takes both (the base rounded before task
/// vectors are taken); the small tensors keep an f32 base and store their delta in `delta`, or
/// f16 if `delta` is block-quantized. The base bytes are what those storages give, and every
/// exported weight of every task is `base + Σ τ` where the task's TALL mask keeps it, `base`
/// elsewhere, bit for bit.
fn check_tall_storage_by_hand(base_storage: Encoding, delta_storage: Encoding) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tall-storage.tpk");
    let tasks = demo_tasks();
    let opts = CompileOptions {
        base_dtype: Some(base_storage),
        delta_dtype: delta_storage,
        ..options(Method::Tall, &tasks, &out)
    };
    let lambda = opts.params.lambda[0];
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    let large = |dims: &[i64]| dims.len() >= 2 && dims.iter().product::<i64>() >= 4096;
    let small_delta = if delta_storage.is_quantized() {
        Encoding::F16
    } else {
        delta_storage
    };
    let storage = |dims: &[i64]| {
        if large(dims) {
            (base_storage, delta_storage)
        } else {
            (Encoding::F32, small_delta)
        }
    };

    let (mut expected_base_bytes, mut large_tensors) = (0u64, 0);
    for t in &bundle.manifest().tensors {
        if let taskpack::format::TensorStorage::Merged { base, delta } = &t.storage {
            let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            let (want_base, want_delta) = storage(&dims);
            assert_eq!(base.encoding, want_base, "{}", t.name);
            assert_eq!(delta.map(|d| d.encoding), Some(want_delta), "{}", t.name);
            let n = t.shape.iter().product::<u64>();
            expected_base_bytes += match want_base {
                Encoding::Q8 => n.div_ceil(64) * 68,
                Encoding::F16 => n * 2,
                _ => n * 4,
            };
            large_tensors += usize::from(large(&dims));
        }
    }
    assert_eq!(large_tensors, 1, "fc.weight is the demo's one large matrix");
    assert_eq!(bundle.sizes().base, expected_base_bytes);

    let base = weights(&demo().join("base.onnx"));
    let thetas: Vec<Weights> = tasks.iter().map(|(_, p)| weights(p)).collect();
    for (t, (name, _)) in tasks.iter().enumerate() {
        let got = export(&bundle, name);
        for (tensor, (dims, b)) in &base {
            if expected_private(tensor, &thetas, &base) {
                continue;
            }
            let (base_e, delta_e) = storage(dims);
            let b = stored(base_e, b);
            let taus: Vec<Vec<f32>> = thetas
                .iter()
                .map(|w| w[tensor].1.iter().zip(&b).map(|(x, y)| x - y).collect())
                .collect();
            let sum: Vec<f32> = (0..b.len())
                .map(|i| taus.iter().fold(0.0f32, |acc, tau| acc + tau[i]))
                .collect();
            let delta = stored(delta_e, &sum);
            for i in 0..b.len() {
                let keep = taus[t][i].abs() > lambda * (sum[i] - taus[t][i]).abs();
                let expected = if keep { b[i] + delta[i] } else { b[i] };
                assert_eq!(
                    got[tensor].1[i].to_bits(),
                    expected.to_bits(),
                    "{name}/{tensor}[{i}]"
                );
            }
        }
    }
}

#[test]
fn tall_with_an_f16_base_is_the_rounded_base_plus_masked_sum_bit_for_bit() {
    check_tall_storage_by_hand(Encoding::F16, Encoding::F32);
}

#[test]
fn tall_with_a_q8_base_and_q4_delta_is_quantized_by_the_spec_bit_for_bit() {
    check_tall_storage_by_hand(Encoding::Q8, Encoding::Q4);
}

/// Squared error of `approx` against `x`.
fn sq_err(x: &[f32], approx: &[f32]) -> f64 {
    x.iter()
        .zip(approx)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum()
}

/// `--method tvq` on the demo (q8 base, default q3 residuals): no shared delta and no masks;
/// every task's exported weight is the stored base plus its own quantized task vector. Checked
/// against rules computed here: the base bytes are [`stored`]'s q8; on the large matrix, each
/// block of 64 of the task vector errs no more than the plain symmetric 3-bit rule
/// (`s = max|τ| / 3`, which the encoder's search includes) and the whole task vector is within
/// 30% relative error; small tensors carry their task vector in f16.
#[test]
fn tvq_is_the_base_plus_each_tasks_quantized_task_vector() {
    let opts = CompileOptions::new(demo().join("base.onnx"), demo_tasks(), Method::Tvq, "x.tpk");
    assert_eq!(
        (opts.base_dtype, opts.residual_dtype),
        (Some(Encoding::Q8), Some(Encoding::Q3)),
        "tvq's defaults"
    );
    check_tvq(
        Encoding::Q8,
        Encoding::Q3,
        (64, |x| quantized(x, 64, 3.0)),
        0.3,
    );
}

/// The same with a q4 base and q2 residuals (`--base-dtype q4 --residual-dtype q2`): the base
/// bytes are [`stored`]'s q4, the residual is taken against them (so it carries the base's
/// rounding error), and each block errs no more than the plain 2-bit rule (`s = max|τ|`, codes
/// −1…1, which the search includes).
#[test]
fn tvq_with_a_q4_base_and_q2_residuals() {
    check_tvq(
        Encoding::Q4,
        Encoding::Q2,
        (64, |x| quantized(x, 64, 1.0)),
        0.6,
    );
}

/// Ternary residuals (`--residual-dtype ternary`, T-Switch's sign module): each block of 128 of
/// the task vector errs no more than the ternary weight networks' threshold rule (Li et al.,
/// 2016: weights with `|τ| > 0.7 · mean |τ|` move by `±` their mean magnitude, the rest stay),
/// which the encoder's least-squares choice of movers can only improve on.
#[test]
fn tvq_with_ternary_residuals() {
    check_tvq(Encoding::Q8, Encoding::Ternary, (128, twn_ternary), 0.7);
}

/// The ternary weight networks' rule on one block (see [`tvq_with_ternary_residuals`]).
fn twn_ternary(x: &[f32]) -> Vec<f32> {
    let delta = 0.7 * x.iter().map(|v| f64::from(v.abs())).sum::<f64>() / x.len() as f64;
    let movers: Vec<f64> = x
        .iter()
        .map(|v| f64::from(v.abs()))
        .filter(|&a| a > delta)
        .collect();
    let s = if movers.is_empty() {
        0.0
    } else {
        (movers.iter().sum::<f64>() / movers.len() as f64) as f32
    };
    x.iter()
        .map(|&v| {
            if f64::from(v.abs()) > delta {
                v.signum() * s
            } else {
                0.0
            }
        })
        .collect()
}

/// A block length and a quantization rule to apply to each block of that length.
type PlainRule = (usize, fn(&[f32]) -> Vec<f32>);

/// Compiles the demo with tvq at `base` / `residual` storage and checks every exported weight
/// (see [`tvq_is_the_base_plus_each_tasks_quantized_task_vector`]): per block of `plain.0` no
/// worse than the rule `plain.1` applied to that block, relative error under `max_relative`.
fn check_tvq(base_enc: Encoding, residual: Encoding, plain: PlainRule, max_relative: f64) {
    let (block, plain) = plain;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tvq.tpk");
    let tasks = demo_tasks();
    let opts = CompileOptions {
        base_dtype: Some(base_enc),
        residual_dtype: Some(residual),
        ..options(Method::Tvq, &tasks, &out)
    };
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    let sizes = bundle.sizes();
    assert_eq!((sizes.delta, sizes.masks), (0, 0));
    assert!(sizes.residuals > 0);

    let base = weights(&demo().join("base.onnx"));
    let thetas: Vec<Weights> = tasks.iter().map(|(_, p)| weights(p)).collect();
    let (mut large_blocks, mut small_values) = (0, 0);
    for (t, (name, _)) in tasks.iter().enumerate() {
        let got = export(&bundle, name);
        let (mut err, mut norm) = (0f64, 0f64);
        for (tensor, (dims, b)) in &base {
            if expected_private(tensor, &thetas, &base) {
                continue;
            }
            let large = dims.len() >= 2 && dims.iter().product::<i64>() >= 4096;
            let b = stored(if large { base_enc } else { Encoding::F32 }, b);
            let theta = &thetas[t][tensor].1;
            let tau: Vec<f32> = theta.iter().zip(&b).map(|(x, y)| x - y).collect();
            let approx: Vec<f32> = got[tensor].1.iter().zip(&b).map(|(x, y)| x - y).collect();
            if large {
                for (x, a) in tau.chunks(block).zip(approx.chunks(block)) {
                    let p = plain(x);
                    let bound = sq_err(x, &p) * (1.0 + 1e-6) + 1e-12;
                    assert!(sq_err(x, a) <= bound, "{name}/{tensor}: {}", sq_err(x, a));
                    large_blocks += 1;
                }
                err += sq_err(&tau, &approx);
                norm += sq_err(&tau, &vec![0.0; tau.len()]);
            } else {
                // b + f16(τ), up to one f16 step of τ (the compiler rounds θ − b as it computed
                // it) and the last bits of b.
                for ((x, g), b) in tau.iter().zip(&got[tensor].1).zip(&b) {
                    let want = b + half::f16::from_f32(*x).to_f32();
                    let tol = x.abs() * 1e-3 + b.abs() * 1e-6 + 1e-12;
                    assert!((g - want).abs() <= tol, "{name}/{tensor}: {g} vs {want}");
                    small_values += 1;
                }
            }
        }
        let relative = (err / norm).sqrt();
        assert!(
            relative > 0.0 && relative < max_relative,
            "{name}: relative error {relative}"
        );
    }
    assert!(large_blocks > 0 && small_values > 0);
}

#[test]
fn residuals_need_a_method_whose_reconstruction_is_known_per_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.tpk");
    let tasks = demo_tasks();
    let emr = CompileOptions {
        residual_dtype: Some(Encoding::Q3),
        ..options(Method::Emr, &tasks, &out)
    };
    let tvq = CompileOptions {
        residual_dtype: None,
        ..options(Method::Tvq, &tasks, &out)
    };
    for (opts, needle) in [
        (emr, "cannot be combined with emr"),
        (tvq, "--residual-dtype"),
    ] {
        let e = compile(&opts, &mut |_| {}).unwrap_err();
        assert!(matches!(e, CompileError::Options(_)), "{e:?}");
        assert!(e.to_string().contains(needle), "{e}");
        assert!(!out.exists());
    }
}

#[test]
fn emr_with_f16_delta_is_within_f16_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("emr.tpk");
    let tasks = demo_tasks();
    let mut opts = options(Method::Emr, &tasks, &out);
    opts.delta_dtype = Encoding::F16;
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    let base = weights(&demo().join("base.onnx"));
    let thetas: Vec<Weights> = tasks.iter().map(|(_, p)| weights(p)).collect();
    let merged: Vec<&String> = base
        .keys()
        .filter(|n| !expected_private(n, &thetas, &base))
        .collect();
    // τ_uni = γ ⊙ max{|τ_t| : sgn τ_t = γ}; M_t = τ_t τ_uni > 0; λ_t over the whole model.
    let uni = |tensor: &str, i: usize| -> (Vec<f32>, f32) {
        let taus: Vec<f32> = thetas
            .iter()
            .map(|w| w[tensor].1[i] - base[tensor].1[i])
            .collect();
        let gamma = taus.iter().fold(0.0f32, |a, x| a + x).signum();
        let eps = taus
            .iter()
            .filter(|x| **x * gamma > 0.0)
            .fold(0.0f32, |a, x| a.max(x.abs()));
        (taus, if gamma == 0.0 { 0.0 } else { gamma * eps })
    };
    let mut num = vec![0.0f64; tasks.len()];
    let mut den = vec![0.0f64; tasks.len()];
    for tensor in &merged {
        for i in 0..base[*tensor].1.len() {
            let (taus, u) = uni(tensor, i);
            for t in 0..tasks.len() {
                num[t] += f64::from(taus[t].abs());
                if taus[t] * u > 0.0 {
                    den[t] += f64::from(u.abs());
                }
            }
        }
    }
    for (t, (name, _)) in tasks.iter().enumerate() {
        let lambda = (num[t] / den[t]) as f32;
        assert!((bundle.manifest().tasks[t].global_scale - lambda).abs() <= 1e-5 * lambda);
        let got = export(&bundle, name);
        for tensor in &merged {
            let b = &base[*tensor].1;
            for (i, g) in got[*tensor].1.iter().enumerate() {
                let (taus, u) = uni(tensor, i);
                let expected = if taus[t] * u > 0.0 {
                    b[i] + lambda * u
                } else {
                    b[i]
                };
                let tolerance = lambda * u.abs() * 2f32.powi(-11) + 1e-6;
                assert!(
                    (g - expected).abs() <= tolerance,
                    "{name}/{tensor}[{i}]: {g} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn safetensors_inputs_give_the_same_bundle_as_onnx_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let onnx_tasks = vec![("mnist".to_string(), demo().join("mnist.onnx"))];
    let st_tasks = vec![("mnist".to_string(), demo().join("mnist.safetensors"))];
    let a = compile(
        &options(Method::Tall, &onnx_tasks, &dir.path().join("a.tpk")),
        &mut |_| {},
    )
    .unwrap();
    let mut opts = options(Method::Tall, &st_tasks, &dir.path().join("b.tpk"));
    opts.base = demo().join("base.safetensors");
    opts.graph = Some(demo().join("base.onnx"));
    let b = compile(&opts, &mut |_| {}).unwrap();
    assert_eq!(export(&a, "mnist"), export(&b, "mnist"));
    let formats: Vec<&str> = b
        .manifest()
        .provenance
        .inputs
        .iter()
        .map(|i| i.format.as_str())
        .collect();
    assert_eq!(formats, ["safetensors", "safetensors"]);
}

#[test]
fn single_task_bundle_reproduces_onnxruntime_golden_logits() {
    use ndarray_npy::NpzReader;
    use tract_onnx::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let tasks = vec![("digits".to_string(), demo().join("digits.onnx"))];
    let mut opts = options(Method::Tall, &tasks, &dir.path().join("one.tpk"));
    // One task, λ = 0: every changed weight is kept, θ̂ = θ_0 + τ.
    opts.params.lambda = vec![0.0];
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    let onnx = taskpack::export::export_task(&bundle, "digits").unwrap();
    let mut npz =
        NpzReader::new(std::fs::File::open(demo().join("digits.test.npz")).unwrap()).unwrap();
    let image: tract_ndarray::ArrayD<f32> = npz.by_name("image").unwrap();
    let golden: tract_ndarray::ArrayD<f32> = npz.by_name("logits").unwrap();
    let model = tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])
        .unwrap()
        .with_input_fact(0, f32::fact(image.shape()).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let out = model.run(tvec!(Tensor::from(image).into())).unwrap();
    let logits = out[0].to_plain_array_view::<f32>().unwrap();
    assert_eq!(logits.shape(), golden.shape());
    let worst = logits
        .iter()
        .zip(golden.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max |tract - onnxruntime| = {worst}");
}

#[test]
fn bundle_verifies_and_reports_sizes_that_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.tpk");
    let bundle = compile(&options(Method::Tall, &demo_tasks(), &out), &mut |_| {}).unwrap();
    bundle.verify().unwrap();
    let s = bundle.sizes();
    assert_eq!(s.total, std::fs::metadata(&out).unwrap().len());
    assert!(s.base > 0 && s.delta > 0 && s.masks > 0 && s.private > 0 && s.graphs > 0);
    let parts =
        s.base + s.delta + s.masks + s.scales + s.private + s.residuals + s.graphs + s.overhead;
    assert_eq!(parts, s.total);
    // Three head shapes in the family at most → at most three graphs, at least one.
    let graphs = bundle.manifest().graphs.len();
    assert!((1..=demo_tasks().len()).contains(&graphs));
}

/// A copy of a demo checkpoint with `edit` applied to its ModelProto.
fn edited(dir: &Path, from: &str, to: &str, edit: impl FnOnce(&mut ModelProto)) -> PathBuf {
    let mut model = ModelProto::decode(&std::fs::read(demo().join(from)).unwrap()[..]).unwrap();
    edit(&mut model);
    let path = dir.join(to);
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

fn initializer<'a>(m: &'a mut ModelProto, name: &str) -> &'a mut tract_onnx::pb::TensorProto {
    m.graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap()
}

#[test]
fn fresh_head_is_detected_and_kept_private() {
    let dir = tempfile::tempdir().unwrap();
    // A task whose head was re-initialized: same shape as the base's, values unrelated.
    let task = edited(dir.path(), "mnist.onnx", "fresh.onnx", |m| {
        let head = initializer(m, "head.weight");
        let n = head.raw_data.len() / 4;
        head.raw_data = (0..n)
            .flat_map(|i| (((i * 7919) % 200) as f32 / 100.0 - 1.0).to_le_bytes())
            .collect();
    });
    let tasks = vec![
        ("fresh".to_string(), task),
        ("mnist".to_string(), demo().join("mnist.onnx")),
    ];
    let mut opts = options(Method::Tall, &tasks, &dir.path().join("a.tpk"));
    opts.auto_private = true;
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    let private = &bundle.manifest().report.private;
    assert!(
        private
            .iter()
            .any(|p| p.starts_with("head.weight: relative change")),
        "{private:?}"
    );
    assert!(
        !private.iter().any(|p| p.starts_with("fc.weight")),
        "{private:?}"
    );
    opts.auto_private = false;
    opts.output = dir.path().join("b.tpk");
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    assert!(!bundle
        .manifest()
        .report
        .private
        .iter()
        .any(|p| p.starts_with("head.weight")));
}

#[test]
fn library_rejects_zero_and_duplicate_tasks_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.tpk");
    let err = compile(&options(Method::Tall, &[], &out), &mut |_| {}).unwrap_err();
    assert!(matches!(err, CompileError::NoTasks), "{err}");
    let twice = vec![
        ("a".to_string(), demo().join("mnist.onnx")),
        ("a".to_string(), demo().join("digits.onnx")),
    ];
    let err = compile(&options(Method::Tall, &twice, &out), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, CompileError::DuplicateTask(ref n) if n == "a"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Asserts that `taskpack compile` with these task arguments fails with one line containing
/// `needle` and leaves the output folder empty.
fn compile_fails(base: &Path, tasks: &[String], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.tpk");
    let mut args = vec![
        "compile".to_string(),
        "--base".into(),
        base.display().to_string(),
    ];
    for t in tasks {
        args.push("--task".into());
        args.push(t.clone());
    }
    args.extend(["-o".into(), out.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = cli(&args);
    assert!(!ok, "compile should fail ({needle})");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{needle:?} not in {err:?}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "output folder should be empty, has {left:?}"
    );
}

fn task_arg(name: &str, path: &Path) -> String {
    format!("{name}={}", path.display())
}

#[test]
fn cli_bad_inputs_fail_with_one_clear_line_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let base = demo().join("base.onnx");
    let mnist = demo().join("mnist.onnx");

    compile_fails(
        &dir.path().join("missing.onnx"),
        &[task_arg("m", &mnist)],
        "missing.onnx",
    );
    compile_fails(
        &base,
        &[task_arg("m", &dir.path().join("nope.onnx"))],
        "nope.onnx",
    );

    let text = dir.path().join("notes.onnx");
    std::fs::write(&text, "these are not the weights you are looking for\n").unwrap();
    compile_fails(&base, &[task_arg("m", &text)], "is not an ONNX model");

    let shorter = edited(dir.path(), "mnist.onnx", "shorter.onnx", |m| {
        m.graph.as_mut().unwrap().node.pop();
    });
    compile_fails(
        &base,
        &[task_arg("m", &shorter)],
        "does not have the base's architecture",
    );

    let missing = edited(dir.path(), "mnist.onnx", "missing_tensor.onnx", |m| {
        m.graph
            .as_mut()
            .unwrap()
            .initializer
            .retain(|t| t.name != "fc.bias");
    });
    compile_fails(
        &base,
        &[task_arg("m", &missing)],
        "has no tensor \"fc.bias\"",
    );

    let half = edited(dir.path(), "mnist.onnx", "half.onnx", |m| {
        let t = initializer(m, "fc.bias");
        let values: Vec<f32> = t
            .raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        t.raw_data.clear();
        DType::F16.encode(&values, &mut t.raw_data);
        t.data_type = 10;
    });
    compile_fails(&base, &[task_arg("m", &half)], "is f32 in the base but f16");

    let nan = edited(dir.path(), "mnist.onnx", "nan.onnx", |m| {
        initializer(m, "fc.weight").raw_data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    compile_fails(
        &base,
        &[task_arg("m", &nan)],
        "non-finite value (NaN) at flat index 2",
    );
    let inf = edited(dir.path(), "mnist.onnx", "inf.onnx", |m| {
        initializer(m, "features.0.weight").raw_data[0..4]
            .copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    compile_fails(&base, &[task_arg("m", &inf)], "non-finite value (inf)");

    compile_fails(
        &base,
        &[
            task_arg("a", &mnist),
            task_arg("a", &demo().join("digits.onnx")),
        ],
        "given twice",
    );

    // Unwritable output: a folder that does not exist.
    let (ok, _, err) = cli(&[
        "compile",
        "--base",
        &base.display().to_string(),
        "--task",
        &task_arg("m", &mnist),
        "-o",
        "/nonexistent-taskpack-dir/out.tpk",
    ]);
    assert!(
        !ok && err.starts_with("error: ") && err.contains("/nonexistent-taskpack-dir"),
        "{err}"
    );

    // Zero tasks: refused by the argument parser.
    let (ok, _, err) = cli(&[
        "compile",
        "--base",
        &base.display().to_string(),
        "-o",
        "x.tpk",
    ]);
    assert!(
        !ok && err.starts_with("error: ") && err.contains("--task"),
        "{err}"
    );
}

#[test]
fn cli_compile_inspect_verify_export() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.tpk");
    let out_s = out.display().to_string();
    let mut args = vec![
        "compile".to_string(),
        "--base".into(),
        demo().join("base.onnx").display().to_string(),
        "--method".into(),
        "emr".into(),
        "--scale".into(),
        "row".into(),
    ];
    for (n, p) in demo_tasks() {
        args.extend(["--task".into(), task_arg(&n, &p)]);
    }
    args.extend(["-o".into(), out_s.clone()]);
    let (ok, stdout, err) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    for part in [
        "base",
        "merged delta",
        "masks",
        "scales",
        "private",
        "graphs",
        "total",
        "their sum",
    ] {
        assert!(stdout.contains(part), "report lacks {part:?}: {stdout}");
    }
    // The report's entropy bound of the masks: Σ over masks of n·H(ones / n), computed here.
    let bundle = Bundle::read(&out).unwrap();
    let m = bundle.manifest();
    let (mut stored, mut entropy) = (0u64, 0f64);
    for (i, tensor) in m.tensors.iter().enumerate() {
        let n = tensor.shape.iter().product::<u64>() as f64;
        for task in &m.tasks {
            if let Some((Some(mask), ..)) = task.tensors[i].merged_parts() {
                let bytes = bundle.section(mask).unwrap();
                stored += bytes.len() as u64;
                let p = bytes.iter().map(|b| b.count_ones()).sum::<u32>() as f64 / n;
                if p > 0.0 && p < 1.0 {
                    entropy += n * -(p * p.log2() + (1.0 - p) * (1.0 - p).log2()) / 8.0;
                }
            }
        }
    }
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("masks") && l.contains("order-0"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains(&format!(
            "{stored} bytes stored, order-0 entropy {entropy:.0} "
        )),
        "{line} vs {stored}, {entropy}"
    );

    let (ok, json, err) = cli(&["inspect", &out_s, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["merge"]["method"], "Emr");
    for task in v["tasks"].as_array().unwrap() {
        assert_eq!(task["scale_mode"], "Row");
    }
    assert_eq!(v["tasks"].as_array().unwrap().len(), demo_tasks().len());
    assert_eq!(v["sizes"]["total"], std::fs::metadata(&out).unwrap().len());

    let (ok, stdout, _) = cli(&["verify", &out_s]);
    assert!(ok && stdout.contains("OK"), "{stdout}");

    let onnx = dir.path().join("mnist.onnx");
    let (ok, _, err) = cli(&[
        "export",
        &out_s,
        "--task",
        "mnist",
        "-o",
        &onnx.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let exported = weights(&onnx);
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        weights(&demo().join("mnist.onnx"))
            .keys()
            .collect::<Vec<_>>()
    );

    let (ok, _, err) = cli(&[
        "export",
        &out_s,
        "--task",
        "nope",
        "-o",
        &onnx.display().to_string(),
    ]);
    assert!(
        !ok && err.contains("no task \"nope\"") && err.contains("mnist"),
        "{err}"
    );

    // One flipped byte in the data region: verify fails, naming the section.
    let mut bytes = std::fs::read(&out).unwrap();
    bytes[64 + 10] ^= 0x40;
    let bad = dir.path().join("bad.tpk");
    std::fs::write(&bad, &bytes).unwrap();
    let (ok, _, err) = cli(&["verify", &bad.display().to_string()]);
    assert!(!ok && err.contains("checksum"), "{err}");
}

/// `--base-dtype q8 --delta-dtype q4` on the command line: the demo's one large matrix is
/// stored block-quantized (`inspect` counts one q8 base and one q4 delta, the small tensors
/// keep f32 / f16), and the bundle verifies.
#[test]
fn cli_quantized_storage_is_what_inspect_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.tpk");
    let (task, path) = demo_tasks().remove(0);
    let (ok, _, err) = crate::common::cli_compile(
        &demo().join("base.onnx"),
        (&task, &path),
        &[
            "--method",
            "emr",
            "--base-dtype",
            "q8",
            "--delta-dtype",
            "q4",
        ],
        &out,
    );
    assert!(ok, "{err}");
    let out_s = out.display().to_string();
    let (ok, stdout, err) = cli(&["inspect", &out_s]);
    assert!(ok, "{err}");
    let storage = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("storage:"))
        .unwrap_or_else(|| panic!("no storage line: {stdout}"));
    assert!(
        storage.contains("q8 ×1;") && storage.contains("q4 ×1"),
        "{storage}"
    );
    assert!(
        storage.contains("base f32 ×") && storage.contains("delta f16 ×"),
        "{storage}"
    );
    let (ok, stdout, _) = cli(&["verify", &out_s]);
    assert!(ok && stdout.contains("OK"), "{stdout}");
}

/// `--max-size` between the sizes of two rungs of the storage ladder picks the first rung that
/// fits: the sizes are measured here by compiling each rung with the library, the choice is
/// the CLI's. A budget below every rung is refused and leaves no file.
#[test]
fn cli_max_size_picks_the_most_faithful_storage_that_fits() {
    use taskpack::compile::{storage_name, STORAGE_LADDER};
    let dir = tempfile::tempdir().unwrap();
    let tasks = demo_tasks();
    let sizes: Vec<u64> = STORAGE_LADDER
        .iter()
        .enumerate()
        .map(|(i, &(base, delta))| {
            let out = dir.path().join(format!("rung{i}.tpk"));
            let opts = CompileOptions {
                base_dtype: base,
                delta_dtype: delta,
                ..CompileOptions::new(demo().join("base.onnx"), tasks.clone(), Method::Emr, &out)
            };
            compile(&opts, &mut |_| {}).unwrap().bytes().len() as u64
        })
        .collect();
    assert!(sizes.windows(2).all(|w| w[1] < w[0]), "{sizes:?}");
    let budget = (sizes[2] + sizes[3]) / 2;
    let out = dir.path().join("budget.tpk");
    let mut args = vec![
        "compile".to_string(),
        "--base".into(),
        demo().join("base.onnx").display().to_string(),
        "--method".into(),
        "emr".into(),
        "--max-size".into(),
        budget.to_string(),
    ];
    for (n, p) in &tasks {
        args.extend(["--task".into(), format!("{n}={}", p.display())]);
    }
    args.extend(["-o".into(), out.display().to_string()]);
    let (ok, stdout, err) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let chosen = stdout
        .lines()
        .find(|l| l.contains("chosen"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        chosen.contains(&storage_name(STORAGE_LADDER[3])),
        "{stdout}"
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), sizes[3]);

    // The same budget as a fraction of the task checkpoints' total size (`0.NNNx`).
    let total: u64 = tasks
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    let fraction = format!("{:.9}x", budget as f64 / total as f64);
    let want = (total as f64 * fraction.trim_end_matches('x').parse::<f64>().unwrap()).floor();
    let mut relative = args.clone();
    relative[6] = fraction;
    let (ok, stdout, err) = cli(&relative.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(
        stdout.contains(&format!("size budget {want} bytes")),
        "{stdout}"
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), sizes[3]);

    let small = dir.path().join("small.tpk");
    let n = args.len();
    args[n - 1] = small.display().to_string();
    args[6] = (sizes[4] - 1).to_string();
    let (ok, _, err) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("no storage setting fits"), "{err}");
    // The budget chooses the storage: an explicit one with it is a usage error.
    let mut explicit = args.clone();
    explicit.extend(["--delta-dtype".into(), "f16".into()]);
    let (ok, _, err) = cli(&explicit.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    assert!(!small.exists());
    let scratch: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        scratch.is_empty(),
        "scratch bundles left behind: {scratch:?}"
    );
}

/// A budget as a fraction of the task checkpoints: their sizes summed here (no external data in
/// the demo); a fraction that leaves less than a byte is refused with the sum in the message.
#[test]
fn a_fractional_budget_counts_the_task_checkpoints() {
    use taskpack::compile::{compile_within, Budget};
    let dir = tempfile::tempdir().unwrap();
    let tasks = demo_tasks();
    let total: u64 = tasks
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    let opts = options(Method::Tvq, &tasks, &dir.path().join("b.tpk"));
    let (_, choice) = compile_within(&opts, Budget::OfTasks(0.5), None, &mut |_| {}).unwrap();
    assert_eq!(choice.max_bytes, total / 2);
    let err = compile_within(&opts, Budget::OfTasks(1e-12), None, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains(&format!("{total} bytes")), "{err}");
}

/// `compile_within` renames its chosen candidate to the output: an output that is one of the
/// inputs is refused before anything is written, and the input is left as it was.
#[test]
fn a_size_budget_refuses_an_input_as_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("mnist.onnx");
    std::fs::copy(demo().join("mnist.onnx"), &task).unwrap();
    let before = std::fs::read(&task).unwrap();
    let opts = CompileOptions::new(
        demo().join("base.onnx"),
        vec![("mnist".into(), task.clone())],
        Method::Emr,
        &task,
    );
    let err = taskpack::compile::compile_within(&opts, u64::MAX, None, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("mnist.onnx"), "{err}");
    assert_eq!(std::fs::read(&task).unwrap(), before);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the input remains");
}

/// With `tvq`, `--max-size` walks the residual ladder: a budget between the q4 and q3 rungs
/// (sizes measured here by compiling each rung) gives q3 residuals over a q8 base, and, with the
/// room left, q4 residuals to the tasks whose relative error q4 lowers the most — here 2.5 tasks'
/// worth of room (every demo task has the same tensors, so the same residual bytes): exactly the
/// two tasks with the largest drop in the two rungs' own reports, whose errors in the mixed
/// bundle are then exactly their q4 errors, while the others keep their q3 errors.
#[test]
fn tvq_max_size_picks_the_residual_storage_that_fits_per_task() {
    use taskpack::compile::{compile_within, residual_storage_name, TVQ_STORAGE_LADDER};
    use taskpack::format::TaskTensor;
    let dir = tempfile::tempdir().unwrap();
    let tasks = demo_tasks();
    let rung = |i: usize, out: &Path| CompileOptions {
        base_dtype: TVQ_STORAGE_LADDER[i].0,
        residual_dtype: Some(TVQ_STORAGE_LADDER[i].1),
        ..CompileOptions::new(demo().join("base.onnx"), tasks.clone(), Method::Tvq, out)
    };
    let bundles: Vec<Bundle> = (0..TVQ_STORAGE_LADDER.len())
        .map(|i| {
            let out = dir.path().join(format!("rung{i}.tpk"));
            compile(&rung(i, &out), &mut |_| {}).unwrap()
        })
        .collect();
    let sizes: Vec<u64> = bundles.iter().map(|b| b.bytes().len() as u64).collect();
    assert!(sizes.windows(2).all(|w| w[1] < w[0]), "{sizes:?}");
    let errors = |b: &Bundle| -> Vec<f64> {
        b.manifest()
            .report
            .tasks
            .iter()
            .map(|t| t.relative_error)
            .collect()
    };
    let (q4, q3) = (errors(&bundles[2]), errors(&bundles[3]));
    let per_task = (sizes[2] - sizes[3]) / tasks.len() as u64;
    let out = dir.path().join("budget.tpk");
    let budget = sizes[3] + per_task * 5 / 2;
    let (bundle, choice) = compile_within(&rung(0, &out), budget, None, &mut |_| {}).unwrap();
    assert_eq!(choice.chosen, 3);
    assert_eq!(
        choice.tried.last().map(|t| t.0.clone()),
        Some(residual_storage_name(TVQ_STORAGE_LADDER[3]))
    );
    let len = bundle.bytes().len() as u64;
    assert!(len > sizes[3] && len <= budget, "{len} vs {budget}");
    assert_eq!(choice.bytes, len);

    let mut by_drop: Vec<usize> = (0..tasks.len()).collect();
    by_drop.sort_by(|&a, &b| (q3[b] - q4[b]).total_cmp(&(q3[a] - q4[a])));
    let mut want: Vec<&str> = by_drop[..2].iter().map(|&t| tasks[t].0.as_str()).collect();
    let mut got: Vec<&str> = choice.upgrades.iter().map(|u| u.task.as_str()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let mixed = errors(&bundle);
    for (t, (name, _)) in tasks.iter().enumerate() {
        let upgraded = want.contains(&name.as_str());
        assert_eq!(mixed[t], if upgraded { q4[t] } else { q3[t] }, "{name}");
        let m = bundle.manifest();
        let encodings: Vec<Encoding> = m.tasks[t]
            .tensors
            .iter()
            .filter_map(|module| match module {
                TaskTensor::Residual { residual, .. } => Some(residual.encoding),
                _ => None,
            })
            .collect();
        let large = if upgraded { Encoding::Q4 } else { Encoding::Q3 };
        assert!(encodings.contains(&large), "{name}: {encodings:?}");
        assert!(
            encodings.iter().all(|&e| e == large || e == Encoding::F16),
            "{name}: {encodings:?}"
        );
    }
    // `taskpack inspect` shows each task's residual storage.
    let (ok, stdout, err) = cli(&["inspect", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    for (name, _) in &tasks {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{stdout}"));
        let want = if want.contains(&name.as_str()) {
            "q4"
        } else {
            "q3"
        };
        assert_eq!(row.split_whitespace().nth(6), Some(want), "{row}");
    }
    for u in &choice.upgrades {
        assert_eq!(u.residual, Encoding::Q4);
        let t = tasks.iter().position(|(n, _)| *n == u.task).unwrap();
        assert_eq!(u.relative_error, (q3[t], q4[t]));
    }
}

/// `residual_for` gives the tensors it names their own residual storage: with tvq the demo's
/// large matrix in q2 and everything else as `residual_dtype` (q3; f16 for small tensors);
/// with TALL and no `residual_dtype`, a residual for the named tensor only. EMR refuses it.
#[test]
fn per_tensor_residual_storage_applies_to_the_tensors_it_names() {
    use taskpack::format::TaskTensor;
    let dir = tempfile::tempdir().unwrap();
    let tasks = demo_tasks();
    let fc = vec![(regex::Regex::new(r"^fc\.weight$").unwrap(), Encoding::Q2)];
    let encodings = |bundle: &Bundle| -> Vec<(String, Option<Encoding>)> {
        let m = bundle.manifest();
        m.tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let e = m.tasks.iter().find_map(|task| match &task.tensors[i] {
                    TaskTensor::Residual { residual, .. } => Some(residual.encoding),
                    _ => None,
                });
                (t.name.clone(), e)
            })
            .collect()
    };

    let tvq = CompileOptions {
        residual_for: fc.clone(),
        ..options(Method::Tvq, &tasks, &dir.path().join("tvq.tpk"))
    };
    let bundle = compile(&tvq, &mut |_| {}).unwrap();
    let found = encodings(&bundle);
    assert!(
        found.contains(&("fc.weight".into(), Some(Encoding::Q2))),
        "{found:?}"
    );
    for (name, e) in &found {
        if name != "fc.weight" && e.is_some() {
            assert_eq!(*e, Some(Encoding::F16), "{name}: small tensors keep f16");
        }
    }

    let tall = CompileOptions {
        residual_for: fc.clone(),
        ..options(Method::Tall, &tasks, &dir.path().join("tall.tpk"))
    };
    let bundle = compile(&tall, &mut |_| {}).unwrap();
    let with: Vec<_> = encodings(&bundle)
        .into_iter()
        .filter(|(_, e)| e.is_some())
        .collect();
    assert_eq!(with, vec![("fc.weight".to_string(), Some(Encoding::Q2))]);

    let emr = CompileOptions {
        residual_for: fc,
        ..options(Method::Emr, &tasks, &dir.path().join("emr.tpk"))
    };
    assert!(matches!(
        compile(&emr, &mut |_| {}),
        Err(CompileError::Options(_))
    ));
}
