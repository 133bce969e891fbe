//! Calibration picks, per task, the setting that agrees best with the original model.
//!
//! The expected choice is computed independently of the calibrator: every candidate setting is
//! compiled as an ordinary bundle, the task is exported to ONNX (`export_task`) and run with
//! plain tract next to the original checkpoint, and the agreement is counted here. The
//! calibrator instead runs candidates through the runtime engine.

use crate::common::{demo, demo_tasks};
use std::path::Path;

use taskpack::compile::{compile, compile_calibrated, Calibration, CompileError, CompileOptions};
use taskpack::export::export_task;
use taskpack::format::Encoding;
use taskpack::format::{Method, ScaleMode};
use tract_onnx::prelude::*;

const EXAMPLES: usize = 48;
const LAMBDAS: [f32; 3] = [0.2, 0.5, 0.8];
const CALIBRATED: [&str; 3] = ["digits", "mnist", "parity"];

/// The first `EXAMPLES` images of a task's test set.
fn images(task: &str) -> Tensor {
    let file = std::fs::File::open(demo().join(format!("{task}.test.npz"))).unwrap();
    let mut npz = ndarray_npy::NpzReader::new(file).unwrap();
    let image: tract_ndarray::ArrayD<f32> = npz.by_name("image").unwrap();
    image.into_tensor().slice(0, 0, EXAMPLES).unwrap()
}

/// Logits of an ONNX model (bytes) on `x`, with plain tract, as rows.
fn logits(onnx: &[u8], x: &Tensor) -> Vec<Vec<f32>> {
    let model = crate::common::tract_plan(onnx);
    let out = model.run(tvec!(x.clone().into())).unwrap();
    let view = out[0].to_plain_array_view::<f32>().unwrap();
    let width = *view.shape().last().unwrap();
    let flat: Vec<f32> = view.iter().copied().collect();
    flat.chunks(width).map(<[f32]>::to_vec).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

/// (agreement, RMS distance) of `candidate` against `original`.
fn agreement(original: &[Vec<f32>], candidate: &[Vec<f32>]) -> (f64, f64) {
    let same = original
        .iter()
        .zip(candidate)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let (mut sq, mut n) = (0.0f64, 0usize);
    for (a, b) in original.iter().zip(candidate) {
        for (x, y) in a.iter().zip(b) {
            sq += (f64::from(*x) - f64::from(*y)).powi(2);
            n += 1;
        }
    }
    (same as f64 / original.len() as f64, (sq / n as f64).sqrt())
}

fn options(out: &Path) -> CompileOptions {
    CompileOptions {
        delta_dtype: Encoding::F32,
        ..CompileOptions::new(demo().join("base.onnx"), demo_tasks(), Method::Tall, out)
    }
}

/// Scores of one task under per-task settings, via an ordinary compile + export + plain tract.
fn independent_score(
    dir: &Path,
    task: &str,
    lambda: &[f32],
    scale: &[ScaleMode],
    x: &Tensor,
    original: &[Vec<f32>],
) -> (f64, f64) {
    let out = dir.join("candidate.tpk");
    let mut opts = options(&out);
    opts.params.lambda = lambda.to_vec();
    opts.scale = scale.to_vec();
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    agreement(original, &logits(&export_task(&bundle, task).unwrap(), x))
}

/// Index of the best score: highest agreement, then lowest distance, then first.
fn best(scores: &[(f64, f64)]) -> usize {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        let b = scores[best];
        if s.0 > b.0 || (s.0 == b.0 && s.1 < b.1) {
            best = i;
        }
    }
    best
}

/// The calibration both tests use: the first `EXAMPLES` test images of the `CALIBRATED` tasks,
/// the λs of `LAMBDAS`, no scaling or row scaling.
fn calibration() -> Calibration {
    let inputs = CALIBRATED
        .iter()
        .map(|t| (t.to_string(), vec![("image".to_string(), images(t))]))
        .collect();
    Calibration {
        lambdas: LAMBDAS.to_vec(),
        scales: vec![ScaleMode::None, ScaleMode::Row],
        max_examples: EXAMPLES,
        ..Calibration::new(inputs)
    }
}

#[test]
fn calibration_picks_the_setting_that_agrees_best_with_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = demo_tasks();
    let n = tasks.len();
    let index = |name: &str| tasks.iter().position(|(t, _)| t == name).unwrap();
    let calibration = calibration();
    let inputs = &calibration.inputs;
    let out = dir.path().join("calibrated.tpk");
    let bundle = compile_calibrated(&options(&out), &calibration, &mut |_| {}).unwrap();
    let m = bundle.manifest();

    for name in CALIBRATED {
        let t = index(name);
        let x = &inputs.iter().find(|(n, _)| n == name).unwrap().1[0].1;
        let original = logits(&std::fs::read(&tasks[t].1).unwrap(), x);
        // Round 1: every λ, no scaling, for all tasks at once.
        let lambda_scores: Vec<(f64, f64)> = LAMBDAS
            .iter()
            .map(|&l| {
                independent_score(
                    dir.path(),
                    name,
                    &[l; 5],
                    &[ScaleMode::None; 5],
                    x,
                    &original,
                )
            })
            .collect();
        let best_lambda = LAMBDAS[best(&lambda_scores)];
        // Round 2: row scaling at the task's best λ (the other tasks' settings do not change
        // this task's reconstruction, so they are left at the default here).
        let mut lambda = vec![0.4; n];
        lambda[t] = best_lambda;
        let mut scale = vec![ScaleMode::None; n];
        scale[t] = ScaleMode::Row;
        let row = independent_score(dir.path(), name, &lambda, &scale, x, &original);
        let mut all = lambda_scores.clone();
        all.push(row);
        let expected = best(&all);

        let report = m.report.tasks[t].calibration.as_ref().unwrap();
        assert_eq!(report.examples, EXAMPLES as u64);
        assert_eq!(report.candidates.len(), all.len(), "{name}");
        for (got, want) in report.candidates.iter().zip(&all) {
            assert!(
                (got.agreement - want.0).abs() < 1e-12,
                "{name}: {got:?} vs {want:?}"
            );
            assert!(
                (got.logit_distance - want.1).abs() < 1e-4,
                "{name}: {got:?} vs {want:?}"
            );
        }
        assert_eq!(report.chosen, expected as u64, "{name}: {all:?}");
        // The bundle carries the winner.
        let (want_lambda, want_scale) = if expected < LAMBDAS.len() {
            (LAMBDAS[expected], ScaleMode::None)
        } else {
            (best_lambda, ScaleMode::Row)
        };
        assert_eq!(m.tasks[t].lambda, Some(want_lambda), "{name}");
        assert_eq!(m.tasks[t].scale_mode, want_scale, "{name}");
        // And it reproduces the agreement that was measured.
        let got = agreement(&original, &logits(&export_task(&bundle, name).unwrap(), x));
        assert!((got.0 - all[expected].0).abs() < 1e-12, "{name}");
    }
    // Tasks without calibration inputs keep the defaults.
    for name in ["fashion3", "footwear"] {
        let t = index(name);
        assert!(m.report.tasks[t].calibration.is_none());
        assert_eq!(m.tasks[t].lambda, Some(0.4));
        assert_eq!(m.tasks[t].scale_mode, ScaleMode::None);
    }
    // No scratch bundle is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter()
            .all(|f| !f.to_string_lossy().contains("calibrating")),
        "{left:?}"
    );
}

#[test]
fn calibration_inputs_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.tpk");
    let x = images("mnist");
    let run = |inputs: Vec<(String, Vec<(String, Tensor)>)>| {
        compile_calibrated(&options(&out), &Calibration::new(inputs), &mut |_| {})
    };
    let calib_err = |r: Result<_, CompileError>, needle: &str| match r {
        Err(CompileError::Calibration(m)) => assert!(m.contains(needle), "{m}"),
        Err(e) => panic!("expected a calibration error, got {e}"),
        Ok(_) => panic!("expected a calibration error"),
    };
    calib_err(
        run(vec![("nope".into(), vec![("image".into(), x.clone())])]),
        "not a task",
    );
    calib_err(
        run(vec![
            ("mnist".into(), vec![("image".into(), x.clone())]),
            ("mnist".into(), vec![("image".into(), x.clone())]),
        ]),
        "twice",
    );
    calib_err(
        run(vec![(
            "mnist".into(),
            vec![(
                "image".into(),
                Tensor::zero::<f32>(&[0, 1, 28, 28]).unwrap(),
            )],
        )]),
        "no calibration examples",
    );
    calib_err(
        run(vec![(
            "mnist".into(),
            vec![
                ("image".into(), x.clone()),
                ("other".into(), x.slice(0, 0, 3).unwrap()),
            ],
        )]),
        "different numbers of examples",
    );
    calib_err(
        run(vec![(
            "mnist".into(),
            vec![("a".into(), x.clone()), ("b".into(), x.clone())],
        )]),
        "no calibration array for graph input",
    );
    assert!(!out.exists());
    // tvq calibrates block-quantized residuals only: f16 ones are refused before anything is
    // compiled.
    let tvq = CompileOptions {
        residual_dtype: Some(Encoding::F16),
        ..CompileOptions::new(demo().join("base.onnx"), demo_tasks(), Method::Tvq, &out)
    };
    let calibration = Calibration::new(vec![("mnist".into(), vec![("image".into(), x)])]);
    match compile_calibrated(&tvq, &calibration, &mut |_| {}) {
        Err(CompileError::Options(m)) => assert!(m.contains("block-quantized residuals"), "{m}"),
        Err(e) => panic!("expected an options error, got {e}"),
        Ok(_) => panic!("expected an options error"),
    }
    assert!(!out.exists());
}

/// `--max-size` with `--calib`: the size budget picks the storage with uncalibrated candidates,
/// then calibrates at that storage from the checkpoints it already opened. The result must be
/// what `compile_calibrated` gives at that storage on its own: the same tasks (λ, scale mode,
/// labels), the same candidates and choices, the same sections.
#[test]
fn a_size_budget_with_calibration_calibrates_at_the_storage_it_picked() {
    use taskpack::compile::{compile_within, STORAGE_LADDER};
    let dir = tempfile::tempdir().unwrap();
    let calibration = calibration();
    let at = |rung: usize, out: &Path| CompileOptions {
        base_dtype: STORAGE_LADDER[rung].0,
        delta_dtype: STORAGE_LADDER[rung].1,
        ..options(out)
    };
    // The sizes of rungs 1 and 2, uncalibrated; a budget between them picks rung 2. (Row
    // scales, if calibration picks them, add a few hundred bytes: far below the gap.)
    let size = |rung: usize| {
        let out = dir.path().join(format!("rung{rung}.tpk"));
        compile(&at(rung, &out), &mut |_| {}).unwrap().bytes().len() as u64
    };
    let (s1, s2) = (size(1), size(2));
    assert!(s2 < s1, "{s1} {s2}");
    let budget = s2 + (s1 - s2) / 2;

    let out = dir.path().join("budget.tpk");
    let (got, choice) =
        compile_within(&options(&out), budget, Some(&calibration), &mut |_| {}).unwrap();
    assert_eq!(choice.chosen, 2, "{choice:?}");
    let want = compile_calibrated(
        &at(2, &dir.path().join("direct.tpk")),
        &calibration,
        &mut |_| {},
    )
    .unwrap();
    let (g, w) = (got.manifest(), want.manifest());
    assert_eq!(g.tasks, w.tasks);
    assert_eq!(g.tensors, w.tensors);
    for (a, b) in g.report.tasks.iter().zip(&w.report.tasks) {
        assert_eq!(a.calibration, b.calibration);
    }
    assert_eq!(g.sections.len(), w.sections.len());
    for (a, b) in g.sections.iter().zip(&w.sections) {
        assert_eq!(a.checksum, b.checksum);
    }
}

/// A size budget with tvq and calibration gives the room left to the tasks whose agreement
/// with the original (then logit distance) the previous rung's residuals improve the most per
/// byte. Budget: the q8/q3 rung plus 2.5 tasks' worth of the q8/q4 rung's extra bytes (every
/// demo task has the same tensors). Every calibrated task is scored at both storages, plain and
/// fitted (four candidates, in the report); the expected winners are computed here from those
/// scores by the rule; uncalibrated tasks are never upgraded. The final bundle stores q4
/// residuals for exactly the winners, and each calibrated task's exported model, run with plain
/// tract, reproduces the agreement and distance of its chosen candidate.
#[test]
fn a_tvq_size_budget_with_calibration_upgrades_the_tasks_that_gain_agreement() {
    use taskpack::compile::{compile_within, TVQ_STORAGE_LADDER};
    use taskpack::format::TaskTensor;
    let dir = tempfile::tempdir().unwrap();
    let calibration = calibration();
    let tasks = demo_tasks();
    let at = |rung: usize, out: &Path| CompileOptions {
        base_dtype: TVQ_STORAGE_LADDER[rung].0,
        residual_dtype: Some(TVQ_STORAGE_LADDER[rung].1),
        ..CompileOptions::new(demo().join("base.onnx"), tasks.clone(), Method::Tvq, out)
    };
    assert_eq!(TVQ_STORAGE_LADDER[2].1, Encoding::Q4);
    assert_eq!(TVQ_STORAGE_LADDER[3].1, Encoding::Q3);
    let size = |rung: usize| {
        let out = dir.path().join(format!("rung{rung}.tpk"));
        compile(&at(rung, &out), &mut |_| {}).unwrap().bytes().len() as u64
    };
    let (s2, s3) = (size(2), size(3));
    let per_task = (s2 - s3) / tasks.len() as u64;
    let budget = s3 + per_task * 5 / 2;
    let out = dir.path().join("budget.tpk");
    let (bundle, choice) =
        compile_within(&at(0, &out), budget, Some(&calibration), &mut |_| {}).unwrap();
    assert_eq!(choice.chosen, 3, "{choice:?}");
    assert!(choice.bytes <= budget);

    let m = bundle.manifest();
    let mut gains = Vec::new();
    for (t, (name, _)) in tasks.iter().enumerate() {
        let Some(c) = &m.report.tasks[t].calibration else {
            assert!(
                !CALIBRATED.contains(&name.as_str()),
                "{name} not calibrated"
            );
            continue;
        };
        let scores: Vec<(f64, f64)> = c
            .candidates
            .iter()
            .map(|s| (s.agreement, s.logit_distance))
            .collect();
        assert_eq!(scores.len(), 4, "{name}: {:?}", c.candidates);
        assert!(
            c.candidates[0].setting.starts_with("q3 "),
            "{:?}",
            c.candidates
        );
        assert!(
            c.candidates[2].setting.starts_with("q4 "),
            "{:?}",
            c.candidates
        );
        let (l, u) = (best(&scores[..2]), 2 + best(&scores[2..]));
        let gain = (scores[u].0 - scores[l].0, scores[l].1 - scores[u].1);
        if gain.0 > 0.0 || (gain.0 == 0.0 && gain.1 > 0.0) {
            gains.push((name.clone(), gain));
        }
        // The candidate chosen is the best at the storage the task got.
        let upgraded = choice.upgrades.iter().any(|x| x.task == *name);
        assert_eq!(c.chosen as usize, if upgraded { u } else { l }, "{name}");
        // ... and the bundle reproduces its score through an export and plain tract.
        let x = images(name);
        let original = logits(&std::fs::read(&tasks[t].1).unwrap(), &x);
        let got = agreement(&original, &logits(&export_task(&bundle, name).unwrap(), &x));
        let want = scores[c.chosen as usize];
        assert_eq!(got.0, want.0, "{name}");
        assert!(
            (got.1 - want.1).abs() <= 1e-4 * want.1.max(1e-3),
            "{name}: {got:?} vs {want:?}"
        );
    }
    gains.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(b.1 .1.total_cmp(&a.1 .1)));
    let mut want: Vec<String> = gains.iter().take(2).map(|g| g.0.clone()).collect();
    let mut got: Vec<String> = choice.upgrades.iter().map(|u| u.task.clone()).collect();
    want.sort();
    got.sort();
    assert!(
        !want.is_empty(),
        "no calibrated task gains from q4: {gains:?}"
    );
    assert_eq!(got, want);
    for (t, (name, _)) in tasks.iter().enumerate() {
        let large: Vec<Encoding> = m.tasks[t]
            .tensors
            .iter()
            .filter_map(|module| match module {
                TaskTensor::Residual { residual, .. } if residual.encoding != Encoding::F16 => {
                    Some(residual.encoding)
                }
                _ => None,
            })
            .collect();
        let e = if got.contains(name) {
            Encoding::Q4
        } else {
            Encoding::Q3
        };
        assert!(
            !large.is_empty() && large.iter().all(|&x| x == e),
            "{name}: {large:?}"
        );
    }
}

/// `--calib` with tvq fits each residual row's scale to the layer output on the calibration
/// inputs. A one-MatMul model y = x·W (W 64 × 64, so a q2 row is one block), a base and one
/// task, correlated positive inputs; output 0 dominates, so both candidates agree with the
/// original everywhere and the lower logit distance (the fitted one) must win. Checked against
/// the fit computed here on its own: the plain bundle's code C = Ŵ − W₀, G = XᵀX over the
/// calibration inputs, s solving (G ∘ CCᵀ) s = diag(G τ Cᵀ) by Gaussian elimination, and the
/// fitted bundle's weight W₀ + diag(s)·C.
#[test]
fn tvq_calibration_fits_residual_row_scales_to_the_layer_output() {
    use crate::common::{float_value_info, matmul_model};
    const N: usize = 64;
    const EXAMPLES: usize = 40;
    let mut next = lcg(12345);
    let w0: Vec<f32> = (0..N * N)
        .map(|i| if i % N == 0 { 10.0 } else { next() })
        .collect();
    let tau: Vec<f32> = (0..N * N).map(|_| 0.05 * next()).collect();
    let wt: Vec<f32> = w0.iter().zip(&tau).map(|(a, b)| a + b).collect();
    // Positive, correlated inputs: a shared component plus noise.
    let x: Vec<f32> = (0..EXAMPLES)
        .flat_map(|_| {
            let common = 0.5 * next();
            (0..N)
                .map(|_| 1.0 + common + 0.3 * next())
                .collect::<Vec<_>>()
        })
        .collect();
    let io = |name: &str| float_value_info(name, &[None, Some(N as i64)]);
    let fit = TvqFit::run(
        |w| matmul_model(w, io("x"), io("y")),
        &[N as i64, N as i64],
        (&w0, &wt),
        Tensor::from_shape(&[EXAMPLES, N], &x).unwrap(),
    );
    let report = &fit.report;
    assert_eq!(report.candidates.len(), 2);
    assert_eq!(report.chosen, 1, "{report:?}");
    assert_eq!(report.candidates[0].agreement, 1.0);
    assert_eq!(report.candidates[1].agreement, 1.0);
    assert!(report.candidates[1].logit_distance < report.candidates[0].logit_distance);

    let (w_plain, w_fit) = (&fit.plain, &fit.fitted);
    let c: Vec<f64> = w_plain
        .iter()
        .zip(&w0)
        .map(|(a, b)| f64::from(a - b))
        .collect();
    let t: Vec<f64> = wt.iter().zip(&w0).map(|(a, b)| f64::from(a - b)).collect();
    let mut g = vec![0f64; N * N];
    for row in x.chunks(N) {
        for i in 0..N {
            for j in 0..N {
                g[i * N + j] += f64::from(row[i]) * f64::from(row[j]);
            }
        }
    }
    // A = G ∘ CCᵀ (+ the calibrator's ridge, 1e-6 of the mean diagonal), b = diag(G τ Cᵀ).
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let row = |m: &[f64], i: usize| m[i * N..(i + 1) * N].to_vec();
    let mut a = vec![0f64; N * N];
    for i in 0..N {
        for k in 0..N {
            a[i * N + k] = g[i * N + k] * dot(&row(&c, i), &row(&c, k));
        }
    }
    let ridge = 1e-6 * (0..N).map(|i| a[i * N + i]).sum::<f64>() / N as f64;
    for i in 0..N {
        a[i * N + i] += ridge;
    }
    let mut b: Vec<f64> = (0..N)
        .map(|k| {
            let gt: Vec<f64> = (0..N)
                .map(|j| (0..N).map(|l| g[k * N + l] * t[l * N + j]).sum())
                .collect();
            dot(&gt, &row(&c, k))
        })
        .collect();
    // Gaussian elimination with partial pivoting.
    for col in 0..N {
        let p = (col..N)
            .max_by(|&x, &y| a[x * N + col].abs().total_cmp(&a[y * N + col].abs()))
            .unwrap();
        for k in 0..N {
            a.swap(col * N + k, p * N + k);
        }
        b.swap(col, p);
        for r in col + 1..N {
            let f = a[r * N + col] / a[col * N + col];
            for k in col..N {
                a[r * N + k] -= f * a[col * N + k];
            }
            b[r] -= f * b[col];
        }
    }
    let mut s = vec![0f64; N];
    for r in (0..N).rev() {
        let rest: f64 = (r + 1..N).map(|k| a[r * N + k] * s[k]).sum();
        s[r] = (b[r] - rest) / a[r * N + r];
    }
    assert!(
        s.iter().any(|v| (v - 1.0).abs() > 0.01),
        "the fit moves the scales: {s:?}"
    );
    for i in 0..N {
        for j in 0..N {
            let want = f64::from(w0[i * N + j]) + s[i] * c[i * N + j];
            let got = f64::from(w_fit[i * N + j]);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "W[{i}][{j}]: {got} vs {want} (s = {})",
                s[i]
            );
        }
    }
}

/// The same for a pointwise convolution (y = Conv(x, W), W [64, 64, 1, 1], x [N, 64, 1, 2]):
/// each output channel's residual row gets s_o = c_oᵀGτ_o / c_oᵀGc_o with G summed over every
/// pixel of every example, computed here from the inputs on their own. The second pixel is
/// twice the first, so both candidates agree with the original on every row (the argmax over
/// the last axis) and the fit's lower logit distance must win.
#[test]
fn tvq_calibration_fits_pointwise_convolution_channels() {
    use crate::common::{float_value_info, matmul_model};
    const C: usize = 64;
    const EXAMPLES: usize = 24;
    let mut next = lcg(777);
    let w0: Vec<f32> = (0..C * C).map(|_| 1.0 + 0.2 * next()).collect();
    let tau: Vec<f32> = (0..C * C).map(|_| 0.05 * next()).collect();
    let wt: Vec<f32> = w0.iter().zip(&tau).map(|(a, b)| a + b).collect();
    // NCHW, H = 1, W = 2: pixel 1 = 2 × pixel 0, positive and correlated across channels.
    let mut x = vec![0f32; EXAMPLES * C * 2];
    for n in 0..EXAMPLES {
        let common = 0.5 * next();
        for c in 0..C {
            let v = 1.0 + common + 0.3 * next();
            x[(n * C + c) * 2] = v;
            x[(n * C + c) * 2 + 1] = 2.0 * v;
        }
    }
    let io = |name: &str| float_value_info(name, &[None, Some(C as i64), Some(1), Some(2)]);
    let fit = TvqFit::run(
        |w| {
            let mut model = matmul_model(w, io("x"), io("y"));
            if let Some(node) = model.graph.as_mut().and_then(|g| g.node.first_mut()) {
                node.op_type = "Conv".into();
            }
            model
        },
        &[C as i64, C as i64, 1, 1],
        (&w0, &wt),
        Tensor::from_shape(&[EXAMPLES, C, 1, 2], &x).unwrap(),
    );
    assert_eq!(fit.report.chosen, 1, "{:?}", fit.report);
    assert_eq!(fit.report.candidates[0].agreement, 1.0);

    let (w_plain, w_fit) = (&fit.plain, &fit.fitted);
    // G over pixels: the channel vector of every (example, pixel).
    let mut g = vec![0f64; C * C];
    for n in 0..EXAMPLES {
        for p in 0..2 {
            let v = |c: usize| f64::from(x[(n * C + c) * 2 + p]);
            for i in 0..C {
                for j in 0..C {
                    g[i * C + j] += v(i) * v(j);
                }
            }
        }
    }
    let mut moved = false;
    for o in 0..C {
        let c: Vec<f64> = (0..C)
            .map(|i| f64::from(w_plain[o * C + i] - w0[o * C + i]))
            .collect();
        let t: Vec<f64> = (0..C)
            .map(|i| f64::from(wt[o * C + i] - w0[o * C + i]))
            .collect();
        let gc: Vec<f64> = (0..C)
            .map(|i| (0..C).map(|j| g[i * C + j] * c[j]).sum())
            .collect();
        let s = gc.iter().zip(&t).map(|(a, b)| a * b).sum::<f64>()
            / gc.iter().zip(&c).map(|(a, b)| a * b).sum::<f64>();
        moved |= (s - 1.0).abs() > 0.01;
        for i in 0..C {
            let want = f64::from(w0[o * C + i]) + s * c[i];
            let got = f64::from(w_fit[o * C + i]);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "W[{o}][{i}]: {got} vs {want}"
            );
        }
    }
    assert!(moved, "the fit moves some channel's scale");
}

/// A deterministic generator of values in [-0.5, 0.5) (a 64-bit LCG's top 24 bits).
fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
}

/// A base and one task `t` of a one-weight model (its weight `W` of shape `dims`) compiled with
/// tvq and q2 residuals over an f32 base, plainly and with `--calib` on `x`: the exported
/// weights of both and the calibrated bundle's report.
struct TvqFit {
    plain: Vec<f32>,
    fitted: Vec<f32>,
    report: taskpack::format::CalibrationReport,
}

impl TvqFit {
    fn run(
        model: impl Fn(tract_onnx::pb::TensorProto) -> taskpack::internals::ModelProto,
        dims: &[i64],
        (w0, wt): (&[f32], &[f32]),
        x: Tensor,
    ) -> TvqFit {
        use crate::compile::weights_of;
        use prost::Message;
        use tract_onnx::pb::{tensor_proto::DataType, TensorProto};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, w: &[f32]| {
            let w = TensorProto {
                name: "W".into(),
                dims: dims.to_vec(),
                data_type: DataType::Float as i32,
                float_data: w.to_vec(),
                ..Default::default()
            };
            let path = dir.path().join(name);
            std::fs::write(&path, model(w).encode_to_vec()).unwrap();
            path
        };
        let (base, task) = (write("base.onnx", w0), write("t.onnx", wt));
        let opts = |out: &Path| CompileOptions {
            base_dtype: Some(Encoding::F32),
            residual_dtype: Some(Encoding::Q2),
            ..CompileOptions::new(
                base.clone(),
                vec![("t".into(), task.clone())],
                Method::Tvq,
                out,
            )
        };
        let plain = compile(&opts(&dir.path().join("plain.tpk")), &mut |_| {}).unwrap();
        let calibration = Calibration::new(vec![("t".into(), vec![("x".into(), x)])]);
        let fitted = compile_calibrated(
            &opts(&dir.path().join("fit.tpk")),
            &calibration,
            &mut |_| {},
        )
        .unwrap();
        let export = |b| weights_of(&export_task(b, "t").unwrap())["W"].1.clone();
        TvqFit {
            plain: export(&plain),
            fitted: export(&fitted),
            report: fitted.manifest().report.tasks[0]
                .calibration
                .clone()
                .unwrap(),
        }
    }
}
