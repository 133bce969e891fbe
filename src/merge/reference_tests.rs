//! Cross-check of every method against the independent numpy reference.
//!
//! tests/reference/merge_reference.py re-implements each method in numpy from the formulas,
//! runs it on fixed random task vectors (3 and 4 tasks; tensors of 37, 64, 8×8, 5×6, 0 and
//! 1×3 elements, with exact zeros, a negative zero, ties in magnitude and exact-zero sums) and
//! writes the inputs and expected outputs to tests/data/merge_expectations.txt, a plain
//! `key values…` line format parsed here with `split_whitespace` (see the script for the
//! grammar). Deltas and scales must match to 1e-6 relative, masks exactly.

use super::scaling::{row_scales, tensor_scale};
use super::TensorView;
use crate::format::{DareBase, MergeParams, Method, TiesReduce};
use crate::mask::Mask;

const EXPECTATIONS: &str = include_str!("../../tests/data/merge_expectations.txt");

#[derive(Debug, Default)]
struct Tensor {
    index: u64,
    shape: Vec<usize>,
    taus: Vec<Vec<f32>>,
}

#[derive(Debug, Default)]
struct Out {
    delta: Vec<f32>,
    masks: Vec<Vec<u8>>,
    tensor_scale: Vec<f32>,
    row_scales: Vec<Vec<f32>>,
}

#[derive(Debug, Default)]
struct Run {
    spec: String,
    outs: Vec<Out>,
    task_scales: Vec<f32>,
}

#[derive(Debug, Default)]
struct Model {
    name: String,
    n_tasks: usize,
    tensors: Vec<Tensor>,
    runs: Vec<Run>,
}

fn floats(values: &[&str]) -> Vec<f32> {
    values
        .iter()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad float {v:?}")))
        .collect()
}

fn parse(text: &str) -> Vec<Model> {
    let mut models: Vec<Model> = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let Some((&key, values)) = tokens.split_first() else {
            continue;
        };
        if key.starts_with('#') {
            continue;
        }
        let ctx = || format!("line {}: {line:.60}", no + 1);
        if key == "model" {
            models.push(Model {
                name: values[0].to_string(),
                n_tasks: values[1].parse().unwrap(),
                ..Model::default()
            });
            continue;
        }
        let model = models
            .last_mut()
            .unwrap_or_else(|| panic!("{}: no model", ctx()));
        match key {
            "tensor" => model.tensors.push(Tensor {
                index: values[0].parse().unwrap(),
                shape: values[1..].iter().map(|d| d.parse().unwrap()).collect(),
                taus: Vec::new(),
            }),
            "tau" => model
                .tensors
                .last_mut()
                .expect("tau before tensor")
                .taus
                .push(floats(values)),
            "run" => model.runs.push(Run {
                spec: values.join(" "),
                ..Run::default()
            }),
            _ => {
                let run = model
                    .runs
                    .last_mut()
                    .unwrap_or_else(|| panic!("{}: no run", ctx()));
                match key {
                    "out" => run.outs.push(Out::default()),
                    "task_scales" => run.task_scales = floats(values),
                    _ => {
                        let out = run.outs.last_mut().unwrap_or_else(|| panic!("{}", ctx()));
                        match key {
                            "delta" => out.delta = floats(values),
                            "mask" => out
                                .masks
                                .push(values.iter().map(|b| b.parse().unwrap()).collect()),
                            "tensor_scale" => out.tensor_scale = floats(values),
                            "row_scales" => out.row_scales.push(floats(values)),
                            _ => panic!("{}: unknown key {key}", ctx()),
                        }
                    }
                }
            }
        }
    }
    models
}

/// MergeParams::defaults for the method, overridden by the run's `key=value` pairs.
fn params(spec: &str, n_tasks: usize) -> MergeParams {
    let mut words = spec.split_whitespace();
    let method: Method = words.next().unwrap().parse().unwrap();
    let mut p = MergeParams::defaults(method, n_tasks);
    for kv in words {
        let (k, v) = kv.split_once('=').unwrap();
        match k {
            "alpha" => p.alpha = v.parse().unwrap(),
            "density" => p.density = v.parse().unwrap(),
            "gamma" => p.gamma = v.parse().unwrap(),
            "lambda" => p.lambda = v.split(',').map(|x| x.parse().unwrap()).collect(),
            "min_tasks" => p.min_tasks = v.parse().unwrap(),
            "seed" => p.seed = v.parse().unwrap(),
            "reduce" => {
                p.ties_reduce = match v {
                    "mean" => TiesReduce::Mean,
                    "sum" => TiesReduce::Sum,
                    _ => panic!("reduce {v}"),
                }
            }
            "base" => {
                p.dare_base = match v {
                    "task-arithmetic" => DareBase::TaskArithmetic,
                    "ties" => DareBase::Ties,
                    _ => panic!("base {v}"),
                }
            }
            _ => panic!("unknown parameter {k}"),
        }
    }
    p
}

fn close(a: f32, b: f32) -> bool {
    a == b || (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
}

fn check_floats(what: &str, got: &[f32], want: &[f32], errors: &mut Vec<String>) {
    if got.len() != want.len() {
        errors.push(format!(
            "{what}: length {} != expected {}",
            got.len(),
            want.len()
        ));
        return;
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !close(g, w) {
            errors.push(format!("{what}[{i}]: {g:e} != expected {w:e}"));
        }
    }
}

#[test]
fn every_method_matches_the_numpy_reference() {
    let models = parse(EXPECTATIONS);
    // Guard against a truncated or empty expectation file passing vacuously.
    assert_eq!(models.len(), 2);
    let mut methods_seen = Vec::new();
    let mut outputs = 0;
    let mut errors = Vec::new();
    for model in &models {
        assert!(!model.runs.is_empty() && !model.tensors.is_empty());
        for tensor in &model.tensors {
            assert_eq!(tensor.taus.len(), model.n_tasks, "model {}", model.name);
        }
        for run in &model.runs {
            let p = params(&run.spec, model.n_tasks);
            if !methods_seen.contains(&p.method) {
                methods_seen.push(p.method);
            }
            let mut merger = p.merger(model.n_tasks).unwrap();
            assert_eq!(run.outs.len(), model.tensors.len(), "{}", run.spec);
            for (tensor, want) in model.tensors.iter().zip(&run.outs) {
                let view = TensorView {
                    index: tensor.index,
                    task_vectors: &tensor.taus,
                };
                let at = format!(
                    "model {} tensor {} run `{}`",
                    model.name, tensor.index, run.spec
                );
                let got = merger.merge(&view).unwrap_or_else(|e| panic!("{at}: {e}"));
                outputs += 1;
                check_floats(&format!("{at} delta"), &got.delta, &want.delta, &mut errors);
                let masks: Vec<Option<&Mask>> = match &got.masks {
                    Some(masks) => masks.iter().map(Some).collect(),
                    None => vec![None; model.n_tasks],
                };
                let got_bytes: Vec<Vec<u8>> = masks
                    .iter()
                    .flatten()
                    .map(|m| m.as_bytes().to_vec())
                    .collect();
                if got_bytes != want.masks {
                    errors.push(format!(
                        "{at} masks: {got_bytes:?} != expected {:?}",
                        want.masks
                    ));
                }
                let rows = tensor.shape.first().copied().unwrap_or(1);
                let mut tscales = Vec::new();
                for (t, (mask, tau)) in masks.iter().zip(&tensor.taus).enumerate() {
                    tscales.push(tensor_scale(&got.delta, *mask, tau).unwrap());
                    let rs = row_scales(&got.delta, *mask, tau, rows).unwrap();
                    let want_rs = want.row_scales.get(t).map_or(&[][..], Vec::as_slice);
                    check_floats(&format!("{at} row_scales[{t}]"), &rs, want_rs, &mut errors);
                }
                check_floats(
                    &format!("{at} tensor_scale"),
                    &tscales,
                    &want.tensor_scale,
                    &mut errors,
                );
            }
            let at = format!("model {} run `{}` task_scales", model.name, run.spec);
            check_floats(
                &at,
                &merger.task_scales(model.n_tasks),
                &run.task_scales,
                &mut errors,
            );
        }
    }
    assert_eq!(
        methods_seen.len(),
        Method::ALL.len(),
        "every method is covered"
    );
    assert_eq!(outputs, 2 * 19 + 4 * 19);
    assert!(
        errors.is_empty(),
        "{} mismatches:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn the_reference_exercises_the_edge_cases() {
    // The inputs contain exact zeros, a negative zero, magnitude ties and exact-zero sums, and
    // the masked methods produce both set and clear bits (else the comparison proves little).
    let models = parse(EXPECTATIONS);
    let all: Vec<f32> = models
        .iter()
        .flat_map(|m| &m.tensors)
        .flat_map(|t| &t.taus)
        .flatten()
        .copied()
        .collect();
    assert!(all.iter().any(|x| *x == 0.0 && x.is_sign_negative()));
    assert!(all.iter().filter(|x| **x == 0.0).count() > 50);
    let tall = models[0]
        .runs
        .iter()
        .find(|r| r.spec.starts_with("tall"))
        .unwrap();
    let bytes: Vec<u8> = tall
        .outs
        .iter()
        .flat_map(|o| o.masks.iter().flatten())
        .copied()
        .collect();
    assert!(bytes.iter().any(|&b| b != 0) && bytes.iter().any(|&b| b != 0xFF));
}
