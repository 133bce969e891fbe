//! Binding: one task's weights reconstructed into pooled tensors, each folded through its chain
//! (the matmul packing) while in cache, and put into a copy of the template as constants.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_core::optim::CONST_FOLD_MEM_BUDGET;

use super::batchnorm::batchnorm_affine;
use super::{
    tract_err, BatchNormSource, BindTimings, Buffers, Folded, Held, HeldTensors, Plan,
    SharedWeights, Template, WeightSource, WEIGHT_ALIGN,
};
use crate::runtime::reconstruct;
use crate::runtime::{Bundle, Error};

impl Template {
    /// Materializes task `task`'s weights and binds them into a copy of the template; the
    /// weights every task reconstructs alike come from `shared`.
    pub(crate) fn bind(
        &self,
        bundle: &Bundle,
        task: usize,
        task_name: &str,
        (shared, held): (&SharedWeights, &HeldTensors),
    ) -> Result<(Plan, BindTimings), Error> {
        let mut buffers = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        self.reclaim(held, &mut buffers);
        let result = self.bind_with(bundle, (task, task_name), shared, &mut buffers, true);
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buffers);
        let (plan, timings, kept) = result?;
        if !kept.is_empty() {
            held.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Held {
                    plan: Arc::downgrade(&plan),
                    tensors: kept,
                });
        }
        Ok((plan, timings))
    }

    /// [`Template::bind`] with the given buffers; `eager: false` leaves every fold to tract's
    /// constant propagation (for tests: both must give the same plan). (About 90 lines: one
    /// loop over the slots with an arm per kind of source, then the plan; the arms share the
    /// half-bound model, the lent tensors and the timing, which a split would pass around.)
    fn bind_with(
        &self,
        bundle: &Bundle,
        (task, task_name): (usize, &str),
        shared: &SharedWeights,
        buffers: &mut Buffers,
        eager: bool,
    ) -> Result<(Plan, BindTimings, Vec<Arc<Tensor>>), Error> {
        let started = Instant::now();
        let action = || format!("bind task {task_name}");
        let mut materialize = Duration::ZERO;
        let mut model = self.model.clone();
        // The pooled tensors given to the model, to take back when the plan no longer needs them.
        let mut lent: Vec<Arc<Tensor>> = Vec::new();
        let mut prop_consts = self.prop_consts || !eager;
        let Buffers {
            values,
            params,
            derived,
            tensors,
        } = buffers;
        for source in &self.slots {
            match source {
                WeightSource::Weight {
                    tensor,
                    node,
                    dt,
                    shape,
                    fold,
                    shared: is_shared,
                } => {
                    let fold = if eager { fold.as_slice() } else { &[] };
                    let reconstructing = Instant::now();
                    if *is_shared {
                        let (last, value, complete) = self.shared_weight(
                            bundle,
                            task,
                            (*tensor, *dt, shape),
                            *node,
                            fold,
                            shared,
                        )?;
                        materialize += reconstructing.elapsed();
                        prop_consts |= !complete;
                        replace_by_const(&mut model, last, value, &action)?;
                        continue;
                    }
                    let weight =
                        self.reconstruct(bundle, task, *tensor, *dt, shape, tensors, values)?;
                    materialize += reconstructing.elapsed();
                    let weight = Arc::new(weight);
                    let (last, value, complete) = self.fold(&weight, *node, fold);
                    prop_consts |= !complete;
                    replace_by_const(&mut model, last, value, &action)?;
                    // Folded (e.g. packed): free again, and the next weight of that shape is
                    // reconstructed into it while it is still in cache.
                    match Arc::try_unwrap(weight) {
                        Ok(t) => give_back(tensors, t),
                        Err(t) => lent.push(t),
                    }
                }
                WeightSource::BatchNorm(bn) => {
                    let reconstructing = Instant::now();
                    let [ta, tb] = self.batchnorm(bundle, task, bn, params, derived, tensors)?;
                    materialize += reconstructing.elapsed();
                    replace_by_const(&mut model, bn.slope, Arc::clone(&ta), &action)?;
                    replace_by_const(&mut model, bn.intercept, Arc::clone(&tb), &action)?;
                    lent.extend([ta, tb]);
                }
            }
        }
        model.inputs.clone_from(&self.data_inputs);
        // Without constant propagation the folded weights' sources and chains stay in the model,
        // no longer reachable from its outputs: the plan runs only what the outputs need, so
        // compacting the model would be work on every switch for nothing.
        if prop_consts {
            model.prop_consts().map_err(tract_err(action()))?;
        }
        let plan = model.into_runnable().map_err(tract_err(action()))?;
        // Take back the tensors constant propagation consumed; the plan holds the others.
        let mut kept = Vec::new();
        for t in lent {
            match Arc::try_unwrap(t) {
                Ok(t) => give_back(tensors, t),
                Err(t) => kept.push(t),
            }
        }
        let timings = BindTimings {
            materialize,
            bind: started.elapsed().saturating_sub(materialize),
        };
        Ok((plan, timings, kept))
    }

    /// A weight every task reconstructs alike, folded through `fold`: this template's earlier
    /// result, or the engine's reconstruction (made now by task `task` if it is the first)
    /// folded and kept. Locks are not held while reconstructing or folding; two threads racing
    /// on the first binding both compute the same values, and one result is kept.
    fn shared_weight(
        &self,
        bundle: &Bundle,
        task: usize,
        (tensor, dt, shape): (usize, DatumType, &[usize]),
        node: usize,
        fold: &[usize],
        shared: &SharedWeights,
    ) -> Result<Folded, Error> {
        // Without a chain the value is the engine's tensor itself: nothing to keep per template.
        let chained = !fold.is_empty();
        let folded = || self.folded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(hit) = folded().get(&tensor).filter(|_| chained) {
            return Ok(hit.clone());
        }
        let cached = shared
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(tensor, dt))
            .cloned();
        let raw = match cached {
            Some(raw) => raw,
            None => {
                let (mut fresh, mut values) = (HashMap::new(), Vec::new());
                let t =
                    self.reconstruct(bundle, task, tensor, dt, shape, &mut fresh, &mut values)?;
                let t = Arc::new(t);
                let mut map = shared.0.lock().unwrap_or_else(PoisonError::into_inner);
                Arc::clone(map.entry((tensor, dt)).or_insert(t))
            }
        };
        let result = self.fold(&raw, node, fold);
        if chained {
            folded().insert(tensor, result.clone());
        }
        Ok(result)
    }

    /// The slope and intercept of a rewritten BatchNorm for task `task`, from its four
    /// reconstructed parameters (tract's formulas, [`batchnorm_affine`]), in pooled tensors.
    fn batchnorm(
        &self,
        bundle: &Bundle,
        task: usize,
        bn: &BatchNormSource,
        params: &mut [Vec<f32>; 4],
        derived: &mut [Vec<f32>; 2],
        pool: &mut HashMap<(DatumType, Vec<usize>), Vec<Tensor>>,
    ) -> Result<[Arc<Tensor>; 2], Error> {
        for (id, out) in bn.params.iter().zip(params.iter_mut()) {
            out.clear();
            out.resize(bn.channels, 0.0);
            reconstruct::task_tensor_into(bundle, task, *id, out)?;
        }
        let [gamma, beta, mean, var] = &*params;
        let [a, b] = derived;
        batchnorm_affine(gamma, beta, mean, var, bn.epsilon, a, b);
        let ta = Arc::new(self.fill(pool, bn.slope, bn.dt, &bn.shape, a)?);
        let tb = Arc::new(self.fill(pool, bn.intercept, bn.dt, &bn.shape, b)?);
        Ok([ta, tb])
    }

    /// Tensor `tensor` of task `task`, of type `dt` and `shape`, reconstructed into a pooled
    /// tensor of that type and shape (or a new one).
    #[allow(clippy::too_many_arguments)]
    fn reconstruct(
        &self,
        bundle: &Bundle,
        task: usize,
        tensor: usize,
        dt: DatumType,
        shape: &[usize],
        pool: &mut HashMap<(DatumType, Vec<usize>), Vec<Tensor>>,
        values: &mut Vec<f32>,
    ) -> Result<Tensor, Error> {
        let mut t = take(pool, dt, shape)?;
        let mut view = t
            .try_as_plain_ram_mut()
            .map_err(tract_err("write a weight"))?;
        if dt == DatumType::F16 {
            values.clear();
            values.resize(view.len(), 0.0);
            reconstruct::task_tensor_into(bundle, task, tensor, values)?;
            view.as_slice_mut::<f16>()
                .map_err(tract_err("write a weight"))?
                .iter_mut()
                .zip(values.iter())
                .for_each(|(o, v)| *o = f16::from_f32(*v));
        } else {
            let out = view
                .as_slice_mut::<f32>()
                .map_err(tract_err("write a weight"))?;
            reconstruct::task_tensor_into(bundle, task, tensor, out)?;
        }
        Ok(t)
    }

    /// Evaluates the fold chain `fold` of the weight source `node` on `weight`, as tract's
    /// constant propagation would (`PropConst`: the same evaluation, the same memory guard).
    /// Returns the last node folded (`node` itself if none), its value, and whether the whole
    /// chain was folded; what is not is left to constant propagation (which reports errors).
    fn fold(
        &self,
        weight: &Arc<Tensor>,
        node: usize,
        fold: &[usize],
    ) -> (usize, Arc<Tensor>, bool) {
        let mut last = node;
        let mut value = Arc::clone(weight);
        let input_mem = weight_mem(weight);
        for &n in fold {
            let Some(op) = self.model.nodes.get(n).map(|n| &n.op) else {
                return (last, value, false);
            };
            let result = op.eval_out_of_plan(tvec![Arc::clone(&value).into_tvalue()]);
            let Some(out) = result
                .ok()
                .flatten()
                .filter(|r| r.len() == 1)
                .and_then(|mut r| r.pop())
            else {
                return (last, value, false);
            };
            if weight_mem(&out) > input_mem.max(CONST_FOLD_MEM_BUDGET) {
                return (last, value, false);
            }
            value = out.into_arc_tensor();
            last = n;
        }
        (last, value, true)
    }

    fn length_error(&self, node: usize, got: usize, shape: &[usize]) -> Error {
        Error::Unsupported {
            graph: self.graph,
            reason: format!(
                "weight node {node} gets {got} values, but the graph needs shape {shape:?}"
            ),
        }
    }

    /// A tensor of type `dt` and `shape` holding `values` (for node `node`), pooled if one is
    /// free.
    fn fill(
        &self,
        pool: &mut HashMap<(DatumType, Vec<usize>), Vec<Tensor>>,
        node: usize,
        dt: DatumType,
        shape: &[usize],
        values: &[f32],
    ) -> Result<Tensor, Error> {
        let mut t = take(pool, dt, shape)?;
        if t.len() != values.len() {
            return Err(self.length_error(node, values.len(), shape));
        }
        let mut view = t
            .try_as_plain_ram_mut()
            .map_err(tract_err("write a weight"))?;
        match dt {
            DatumType::F16 => view
                .as_slice_mut::<f16>()
                .map_err(tract_err("write a weight"))?
                .iter_mut()
                .zip(values)
                .for_each(|(o, v)| *o = f16::from_f32(*v)),
            _ => view
                .as_slice_mut::<f32>()
                .map_err(tract_err("write a weight"))?
                .copy_from_slice(values),
        }
        Ok(t)
    }
}

/// Bytes of a tensor's elements, as `PropConst` counts them.
fn weight_mem(t: &Tensor) -> u64 {
    (t.datum_type().size_of() * t.volume()) as u64
}

/// A pooled tensor of type `dt` and `shape`, or a new one (64-byte aligned).
fn take(
    pool: &mut HashMap<(DatumType, Vec<usize>), Vec<Tensor>>,
    dt: DatumType,
    shape: &[usize],
) -> Result<Tensor, Error> {
    if let Some(t) = pool.get_mut(&(dt, shape.to_vec())).and_then(Vec::pop) {
        return Ok(t);
    }
    Tensor::zero_aligned_dt(dt, shape, WEIGHT_ALIGN).map_err(tract_err("allocate a weight"))
}

impl Template {
    /// Takes back into `buffers` the tensors of every plan that is gone (evicted from the cache
    /// and no longer run; the last reference to each is then `held`'s), as many of each type
    /// and shape as one binding of this template takes: the plans may be other templates', and
    /// a pool must not grow with tensors its template never asks for. The rest are freed.
    fn reclaim(&self, held: &HeldTensors, buffers: &mut Buffers) {
        let gone: Vec<Held> = {
            let mut held = held.0.lock().unwrap_or_else(PoisonError::into_inner);
            let (gone, alive) = held.drain(..).partition(|h| h.plan.strong_count() == 0);
            *held = alive;
            gone
        };
        for t in gone.into_iter().flat_map(|h| h.tensors) {
            let Ok(t) = Arc::try_unwrap(t) else { continue };
            let pooled = buffers
                .tensors
                .get(&(t.datum_type(), t.shape().to_vec()))
                .map_or(0, Vec::len);
            if pooled < self.takes(t.datum_type(), t.shape()) {
                give_back(&mut buffers.tensors, t);
            }
        }
    }

    /// How many pooled tensors of type `dt` and shape `shape` one binding takes: one per
    /// task-dependent weight of them, two (slope and intercept) per rewritten BatchNorm.
    fn takes(&self, dt: DatumType, shape: &[usize]) -> usize {
        self.slots
            .iter()
            .map(|s| match s {
                WeightSource::Weight {
                    dt: d,
                    shape: sh,
                    shared: false,
                    ..
                } if *d == dt && sh == shape => 1,
                WeightSource::BatchNorm(bn) if bn.dt == dt && bn.shape == shape => 2,
                _ => 0,
            })
            .sum()
    }
}

fn give_back(pool: &mut HashMap<(DatumType, Vec<usize>), Vec<Tensor>>, t: Tensor) {
    pool.entry((t.datum_type(), t.shape().to_vec()))
        .or_default()
        .push(t);
}

/// Makes node `node` of `model` a constant holding `value` (with the exotic fact, e.g. the
/// packing format, of its output in the template), detached from its inputs.
fn replace_by_const(
    model: &mut TypedModel,
    node: usize,
    value: Arc<Tensor>,
    action: &impl Fn() -> String,
) -> Result<(), Error> {
    let missing = || Error::Tract {
        action: action(),
        message: format!("node {node} is not in the template"),
    };
    let exotic = model
        .nodes
        .get(node)
        .and_then(|n| n.outputs.first())
        .ok_or_else(missing)?
        .fact
        .exotic_fact
        .clone();
    let op = Const::new_with_opt_exotic_fact(value, exotic).map_err(tract_err(action()))?;
    let fact = op
        .output_facts(&[])
        .map_err(tract_err(action()))?
        .into_iter()
        .next()
        .ok_or_else(missing)?;
    let inputs = {
        let n = model.nodes.get_mut(node).ok_or_else(missing)?;
        let output = n.outputs.get_mut(0).ok_or_else(missing)?;
        output.fact = fact;
        n.op = Box::new(op);
        std::mem::take(&mut n.inputs)
    };
    for (slot, input) in inputs.iter().enumerate() {
        if let Some(out) = model
            .nodes
            .get_mut(input.node)
            .and_then(|n| n.outputs.get_mut(input.slot))
        {
            out.successors
                .retain(|s| !(s.node == node && s.slot == slot));
        }
    }
    Ok(())
}

/// The nodes constant propagation would fold into weight source `source` by itself: starting
/// from its only consumer, each node with that one input and one output, as long as the value
/// has one consumer (`PropConst`'s walk; a weight read by several nodes is left to it).
pub(super) fn fold_chain(model: &TypedModel, source: usize) -> Vec<usize> {
    let mut chain = Vec::new();
    let mut current = source;
    while let Some([output]) = model.nodes.get(current).map(|n| n.outputs.as_slice()) {
        let [next] = output.successors.as_slice() else {
            break;
        };
        let Some(node) = model.nodes.get(next.node) else {
            break;
        };
        if node.inputs.len() != 1
            || node.outputs.len() != 1
            || node.op_is::<Const>()
            || node.op_is::<TypedSource>()
        {
            break;
        }
        chain.push(node.id);
        current = node.id;
    }
    chain
}

/// Whether binding must run constant propagation: some node outside the fold chains reads a
/// weight (or what a chain makes of it) and has only constant inputs once the weights are bound.
pub(super) fn needs_prop_consts(model: &TypedModel, slots: &[WeightSource]) -> bool {
    let mut bound: HashSet<usize> = HashSet::new();
    for slot in slots {
        match slot {
            WeightSource::Weight { node, fold, .. } => {
                bound.insert(*node);
                bound.extend(fold.iter().copied());
            }
            WeightSource::BatchNorm(bn) => {
                bound.extend([bn.slope, bn.intercept]);
            }
        }
    }
    model.nodes.iter().any(|n| {
        !bound.contains(&n.id)
            && !n.op_is::<Const>()
            && n.inputs.iter().any(|i| bound.contains(&i.node))
            && n.inputs.iter().all(|i| {
                bound.contains(&i.node) || model.outlet_fact(*i).is_ok_and(|f| f.konst.is_some())
            })
    })
}

#[cfg(all(test, feature = "compiler"))]
mod tests {
    use super::super::stored::graph_weights;
    use super::super::TemplateKey;
    use super::*;
    use crate::compile::{compile, CompileOptions};
    use crate::format::{Manifest, Method};

    /// The demo `tasks` compiled with `method` (options edited by `edit`), read back.
    fn demo_bundle(
        tasks: &[&str],
        method: Method,
        edit: impl FnOnce(CompileOptions) -> CompileOptions,
    ) -> Bundle {
        models_bundle("demo", tasks, method, edit)
    }

    /// The bundle of `tasks` of the model family in `models/FAMILY`.
    fn models_bundle(
        family: &str,
        tasks: &[&str],
        method: Method,
        edit: impl FnOnce(CompileOptions) -> CompileOptions,
    ) -> Bundle {
        let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(family);
        let tasks: Vec<(String, std::path::PathBuf)> = tasks
            .iter()
            .map(|t| (t.to_string(), demo.join(format!("{t}.onnx"))))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("demo.tpk");
        let opts = edit(CompileOptions::new(
            demo.join("base.onnx"),
            tasks,
            method,
            &out,
        ));
        drop(compile(&opts, &mut |_| {}).unwrap());
        Bundle::read(&out).unwrap()
    }

    /// Each tensor's index by name.
    fn tensor_indices(m: &Manifest) -> HashMap<&str, usize> {
        m.tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect()
    }

    /// A large tensor that is the base for every task (tvq with `--shared ^fc\.weight$`: no
    /// residual) is a shared input of every template, reconstructed once per engine, not a
    /// constant baked into each graph's template; a small one (a bias) stays a constant.
    #[test]
    fn large_constants_are_shared_inputs_small_ones_stay_constants() {
        let bundle = demo_bundle(&["digits", "fashion3"], Method::Tvq, |o| CompileOptions {
            shared: Some(regex::Regex::new(r"^fc\.(weight|bias)$").unwrap()),
            ..o
        });
        let m = bundle.manifest();
        let by_name = tensor_indices(m);
        let (weight, bias) = (by_name["fc.weight"], by_name["fc.bias"]);
        for (task, entry) in m.tasks.iter().enumerate() {
            let used = graph_weights(&bundle, entry.graph as usize, &by_name).unwrap();
            let key = TemplateKey::for_task(entry, &used);
            let template = Template::build(&bundle, &key, task, &used, &[]).unwrap();
            let slot = |tensor: usize| {
                template.slots.iter().find_map(|s| match s {
                    WeightSource::Weight {
                        tensor: t, shared, ..
                    } if *t == tensor => Some(*shared),
                    _ => None,
                })
            };
            assert_eq!(
                slot(weight),
                Some(true),
                "{}: fc.weight is a shared input",
                entry.name
            );
            assert_eq!(slot(bias), None, "{}: fc.bias stays a constant", entry.name);
        }
    }

    /// Folding each weight's chain as it is reconstructed gives the plan tract's constant
    /// propagation gives: the same outputs, bit for bit, on every demo task.
    #[test]
    fn eager_folding_matches_constant_propagation() {
        let bundle = demo_bundle(&["digits", "mnist", "parity"], Method::Emr, |o| o);
        let m = bundle.manifest();
        let by_name = tensor_indices(m);
        let input = Tensor::from_shape(
            &[2, 1, 28, 28],
            &(0..2 * 28 * 28)
                .map(|i| (i % 97) as f32 / 97.0)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let mut folded = 0;
        for (task, entry) in m.tasks.iter().enumerate() {
            let graph = entry.graph as usize;
            let used = graph_weights(&bundle, graph, &by_name).unwrap();
            let key = TemplateKey::for_task(entry, &used);
            let template = Template::build(&bundle, &key, task, &used, &[]).unwrap();
            folded += template
                .slots
                .iter()
                .filter(|s| matches!(s, WeightSource::Weight { fold, .. } if !fold.is_empty()))
                .count();
            let mut outputs = Vec::new();
            for eager in [true, false] {
                let mut buffers = Buffers::default();
                let (plan, _, _) = template
                    .bind_with(
                        &bundle,
                        (task, &entry.name),
                        &SharedWeights::default(),
                        &mut buffers,
                        eager,
                    )
                    .unwrap();
                let out = plan.run(tvec![input.clone().into_tvalue()]).unwrap();
                let bits: Vec<u32> = out[0]
                    .to_plain_array_view::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                outputs.push(bits);
            }
            assert_eq!(outputs[0], outputs[1], "task {}", entry.name);
        }
        assert!(folded > 0, "the demo graphs have weights folded eagerly");
    }

    /// Tensors a plan holds (the text model's embedding tables, which it uses unfolded) come
    /// back once the plan is gone: the next binding reconstructs into the very same allocations,
    /// and its plan computes what a binding into fresh memory computes, bit for bit. While a
    /// plan is alive nothing of it is taken.
    #[test]
    fn held_tensors_are_reused_once_their_plan_is_gone() {
        let bundle = models_bundle("text", &["mood"], Method::Tvq, |o| o);
        let m = bundle.manifest();
        let by_name = tensor_indices(m);
        let entry = &m.tasks[0];
        let used = graph_weights(&bundle, entry.graph as usize, &by_name).unwrap();
        let key = TemplateKey::for_task(entry, &used);
        let template = Template::build(&bundle, &key, 0, &used, &[]).unwrap();
        let ids = Tensor::from_shape(&[1, 6], &[2i64, 7, 11, 5, 3, 1]).unwrap();
        let mask = Tensor::from_shape(&[1, 6], &[1i64; 6]).unwrap();
        let types = Tensor::from_shape(&[1, 6], &[0i64; 6]).unwrap();
        let run = |plan: &Plan| -> Vec<u32> {
            let inputs = [&ids, &mask, &types].map(|t| t.clone().into_tvalue());
            let out = plan.run(inputs.into_iter().collect()).unwrap();
            let view = out[0].to_plain_array_view::<f32>().unwrap();
            view.iter().map(|v| v.to_bits()).collect()
        };
        let addresses = |held: &HeldTensors| -> Vec<Vec<usize>> {
            let held = held.0.lock().unwrap();
            held.iter()
                .map(|h| {
                    h.tensors
                        .iter()
                        .map(|t| t.as_bytes().as_ptr() as usize)
                        .collect()
                })
                .collect()
        };
        let (shared, held) = (SharedWeights::default(), HeldTensors::default());
        let (first, _) = template.bind(&bundle, 0, "mood", (&shared, &held)).unwrap();
        let first_addresses = addresses(&held);
        assert_eq!(first_addresses.len(), 1, "the plan holds pooled tensors");
        assert!(!first_addresses[0].is_empty());

        // Alive: a second binding allocates its own.
        let (second, _) = template.bind(&bundle, 0, "mood", (&shared, &held)).unwrap();
        let alive = addresses(&held);
        assert_eq!(alive.len(), 2);
        assert!(alive[1].iter().all(|a| !first_addresses[0].contains(a)));
        let want = run(&second);
        drop((first, second));

        // Gone: the next binding takes them back, into the same memory.
        let (again, _) = template.bind(&bundle, 0, "mood", (&shared, &held)).unwrap();
        let reused = addresses(&held);
        assert_eq!(reused.len(), 1, "the dead plans' entries are gone");
        let mut got = reused[0].clone();
        let mut before: Vec<usize> = first_addresses[0]
            .iter()
            .chain(&alive[1])
            .copied()
            .collect();
        got.sort_unstable();
        before.sort_unstable();
        assert!(
            got.iter().all(|a| before.binary_search(a).is_ok()),
            "{got:?} vs {before:?}"
        );
        assert_eq!(run(&again), want, "the same outputs from reused memory");
    }

    /// The pool takes back, from a dead plan, only what one binding of its template asks for:
    /// a shape it never uses is freed, and of a shape it uses `k` times at most `k` are kept.
    #[test]
    fn reclaim_keeps_only_what_the_template_takes() {
        let bundle = models_bundle("text", &["mood"], Method::Tvq, |o| o);
        let m = bundle.manifest();
        let by_name = tensor_indices(m);
        let entry = &m.tasks[0];
        let used = graph_weights(&bundle, entry.graph as usize, &by_name).unwrap();
        let key = TemplateKey::for_task(entry, &used);
        let template = Template::build(&bundle, &key, 0, &used, &[]).unwrap();
        let (dt, shape) = template
            .slots
            .iter()
            .find_map(|s| match s {
                WeightSource::Weight {
                    dt,
                    shape,
                    shared: false,
                    ..
                } => Some((*dt, shape.clone())),
                _ => None,
            })
            .unwrap();
        let uses = template
            .slots
            .iter()
            .filter(|s| {
                matches!(s, WeightSource::Weight { dt: d, shape: sh, shared: false, .. }
                    if *d == dt && *sh == shape)
            })
            .count();
        assert!(uses > 0);
        let foreign = vec![7usize, 7];
        let mut tensors = vec![Arc::new(Tensor::zero_dt(DatumType::F32, &foreign).unwrap())];
        for _ in 0..uses + 2 {
            tensors.push(Arc::new(Tensor::zero_dt(dt, &shape).unwrap()));
        }
        let held = HeldTensors::default();
        held.0.lock().unwrap().push(Held {
            plan: std::sync::Weak::new(),
            tensors,
        });
        let mut buffers = Buffers::default();
        template.reclaim(&held, &mut buffers);
        assert!(held.0.lock().unwrap().is_empty());
        assert!(!buffers.tensors.contains_key(&(DatumType::F32, foreign)));
        assert_eq!(buffers.tensors.get(&(dt, shape)).map(Vec::len), Some(uses));
    }
}
