//! Templates: one optimized tract model per distinct graph, with the task-dependent weights left
//! as model inputs, and the binding of one task's weights into a copy of it.
//!
//! Why: parsing, decluttering and optimizing a model dominate the cost of loading it
//! (docs/PERFORMANCE.md: `taskpack bench` times both), and none of that work depends on the values of the weights. A template does it once per
//! graph with every weight some task changes declared as a `TypedSource` of known type and shape,
//! and every weight no task changes (a merged tensor without delta) as a constant. Weights every
//! task reconstructs alike although they have a delta (`compile --shared`) stay inputs, but are
//! reconstructed once per engine ([`SharedWeights`]) and folded once per template: a switch
//! only puts them back, and every graph's plan holds the same tensor where nothing is folded
//! into it (an embedding table read by a `Gather`). Binding a task
//! then reconstructs one weight at a time ([`reconstruct::task_tensor_into`]) into a pooled
//! tensor and at once evaluates what constant propagation would fold into that weight alone: the
//! chain of single-input nodes after it (the matmul packing, reshapes), while the weight is still
//! in cache. The chain's last node becomes a `Const` holding the result, and the pooled tensor is
//! free for the next weight of its shape: binding keeps one tensor per weight shape, not one per
//! weight. What depends on several weights (e.g. a BatchNorm folded into the preceding
//! convolution) is left to tract's constant propagation, which binding runs only for templates
//! that have such nodes. Either way the plan's constants are those `prop_consts` would compute:
//! the same ops evaluated on the same values.
//!
//! **BatchNormalization.** tract lowers `BatchNormalization` to `x·slope + intercept` only when
//! its four parameters are constants, which task-dependent parameters (per-task running
//! statistics) are not. So, before parsing, each `BatchNormalization` node with a task-dependent
//! parameter is rewritten at the ONNX level into `Add(intercept, Mul(slope, x))`, where `slope` and
//! `intercept` are new task-dependent inputs of shape `[1, C, 1, …]` (the rank of `x`, found by
//! tract's shape analysis) that binding computes from the task's four parameters with tract's own
//! formulas (`slope = γ / √(var + ε)`, `intercept = β − mean·γ / √(var + ε)`, in `f32`). This is
//! the graph tract itself builds for a constant BatchNormalization, so the optimizer folds it into
//! the preceding convolution the same way, and binding evaluates that folding.
//!
//! **Batch size.** Data inputs keep the symbolic dimensions the ONNX graph declares (e.g. a batch
//! `N`): one bound plan serves every batch size, with tract resolving the symbols per call. The
//! engine's `symbol_values` option fixes chosen symbols before typing instead, so that tract
//! optimizes for that exact shape (as it would a model loaded with a concrete input fact).
//!
//! The steps, one file each: [`stored`] decodes the stored graph and finds the weights it reads;
//! [`batchnorm`] rewrites the task-dependent BatchNorms; [`typing`] declares the weights and
//! parses and types the graph with tract (with [`flatten`]'s checked `Flatten`); this file
//! declutters and optimizes it into a [`Template`]; [`bind`] binds one task's weights into a copy.

mod batchnorm;
mod bind;
mod flatten;
mod stored;
mod typing;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

use crate::dtype::DType;
use crate::format::manifest::{TaskEntry, TaskTensor};
use crate::runtime::engine::IoInfo;
use crate::runtime::guard::{self, IndexLimit};
use crate::runtime::reconstruct::{self, DecodeBuffers};
use crate::runtime::{Bundle, Error};

use batchnorm::BnRewrite;
use bind::{fold_chain, needs_prop_consts};
#[cfg(feature = "compiler")]
pub(crate) use stored::read_names;
pub(crate) use stored::{decode_graph, weights_read};
use typing::WeightFacts;
pub(crate) use typing::{catch_panic, type_graph, TypedGraph, WeightDecl};

/// Alignment of materialized weight tensors (a cache line, and enough for any SIMD load).
const WEIGHT_ALIGN: usize = 64;

/// A bound task: a runnable plan with every weight constant.
pub(crate) type Plan = Arc<TypedRunnableModel>;

/// What a template needs to know about its graph, computed from metadata when the engine opens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TemplateKey {
    /// Index of the graph in the manifest.
    pub graph: usize,
    /// `(tensor index, shape)` of every private weight the graph uses, for one task: tasks that
    /// share a graph but whose private tensors differ in shape need distinct templates.
    pub private_shapes: Vec<(usize, Vec<u64>)>,
}

impl TemplateKey {
    /// The key of `task`'s template: its graph, and the shapes of the private weights among
    /// `used` (the weights that graph uses).
    pub(crate) fn for_task(task: &TaskEntry, used: &[usize]) -> TemplateKey {
        TemplateKey {
            graph: task.graph as usize,
            private_shapes: used
                .iter()
                .filter_map(|&i| match task.tensors.get(i) {
                    Some(TaskTensor::Private { shape, .. }) => Some((i, shape.clone())),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// Fewest elements (of a matrix or larger) for a tensor that is the base for every task to be
/// shared across templates rather than copied into each (64 KiB of `f32`): below it, a copy
/// per graph costs less than an input to put back at every binding.
const SHARED_CONSTANT_ELEMENTS: u64 = 1 << 14;

/// Whether a tensor of `shape` is large enough to share across templates.
fn is_large(shape: &[u64]) -> bool {
    shape.len() >= 2
        && shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .is_none_or(|n| n >= SHARED_CONSTANT_ELEMENTS)
}

/// Where one source of the template gets its value from at binding.
#[derive(Debug, Clone)]
enum WeightSource {
    /// A bundle tensor, reconstructed for the task.
    Weight {
        tensor: usize,
        node: usize,
        dt: DatumType,
        shape: Vec<usize>,
        /// The single-input nodes constant propagation would fold into this weight (typically
        /// the matmul packing), in order: binding evaluates them right after reconstructing
        /// the weight, while it is in cache (see [`fold_chain`]).
        fold: Vec<usize>,
        /// The same for every task ([`reconstruct::same_for_every_task`]): taken from the
        /// engine's [`SharedWeights`] and folded once per template.
        shared: bool,
    },
    /// The slope and intercept replacing a `BatchNormalization` node.
    BatchNorm(BatchNormSource),
}

/// The slope and intercept inputs of a rewritten `BatchNormalization` node.
#[derive(Debug, Clone)]
struct BatchNormSource {
    /// Tensor indices of scale, bias, mean and variance.
    params: [usize; 4],
    epsilon: f32,
    channels: usize,
    dt: DatumType,
    /// `[1, C, 1, …]`.
    shape: Vec<usize>,
    slope: usize,
    intercept: usize,
}

/// The weights every task reconstructs alike, reconstructed once per engine at their first
/// binding and kept for the engine's lifetime (like its templates), by tensor and type.
#[derive(Debug, Default)]
pub(crate) struct SharedWeights(Mutex<HashMap<(usize, DatumType), Arc<Tensor>>>);

/// A shared weight folded through one template's chain: `(last node, value, complete)` as
/// `Template::fold` returns it.
type Folded = (usize, Arc<Tensor>, bool);

/// The binding tensors that bound plans hold (weights a plan uses unfolded, e.g. an embedding
/// table), engine-wide: once a plan is gone (evicted from the cache and no longer run), the
/// next binding of any template takes its tensors back into its pool by type and shape, instead
/// of freeing them and allocating — and page-faulting — the same sizes again
/// (docs/PERFORMANCE.md). The engine drops the plans a binding will evict before it binds, so
/// that binding takes their tensors back at once; only the tensors of a plan bound outside the
/// cache (`Engine::bind`) and dropped since wait here for the next binding.
#[derive(Debug, Default)]
pub(crate) struct HeldTensors(Mutex<Vec<Held>>);

impl HeldTensors {
    /// Forgets every plan's tensors (with the cache cleared, every plan is gone).
    pub(crate) fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// `(gone, alive)`: how many plans' tensors wait, by whether the plan is gone.
    #[cfg(all(test, feature = "compiler"))]
    pub(crate) fn waiting(&self) -> (usize, usize) {
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let gone = held.iter().filter(|h| h.plan.strong_count() == 0).count();
        (gone, held.len() - gone)
    }
}

/// The pooled tensors one bound plan holds, and the plan (weakly: the cache owns it).
#[derive(Debug)]
struct Held {
    plan: std::sync::Weak<TypedRunnableModel>,
    tensors: Vec<Arc<Tensor>>,
}

/// Reused memory for binding. Weight tensors the bound plan does not reference (typically the
/// matmul weights, which the plan keeps packed) come back here by type and shape, so the next
/// weight of that shape is reconstructed into memory that is mapped and, as the weights are
/// packed one at a time, still in cache. With every packed weight folded as soon as it is
/// reconstructed, that is one tensor per distinct weight shape, not one per weight.
#[derive(Default)]
pub(crate) struct Buffers {
    values: Vec<f32>,
    params: [Vec<f32>; 4],
    derived: [Vec<f32>; 2],
    tensors: HashMap<(DatumType, Vec<usize>), Vec<Tensor>>,
}

/// One optimized model of a graph, with task-dependent weights as inputs.
pub(crate) struct Template {
    graph: usize,
    model: TypedModel,
    data_inputs: Vec<OutletId>,
    slots: Vec<WeightSource>,
    inputs: Vec<IoInfo>,
    input_facts: Vec<TypedFact>,
    /// Data inputs that index a lookup table, and its size (checked before each run).
    index_limits: Vec<IndexLimit>,
    outputs: Vec<IoInfo>,
    weight_bytes: usize,
    /// Whether some node outside the fold chains computes from the weights only, so that
    /// binding must run tract's constant propagation (e.g. a BatchNorm folded into a
    /// convolution); see [`needs_prop_consts`].
    prop_consts: bool,
    pool: Mutex<Vec<Buffers>>,
    /// The shared weights as this template's chains fold them, by tensor index.
    folded: Mutex<HashMap<usize, Folded>>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("graph", &self.graph)
            .field("nodes", &self.model.nodes.len())
            .field("weights", &self.slots.len())
            .field("weight_bytes", &self.weight_bytes)
            .finish_non_exhaustive()
    }
}

/// Timings of one binding, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BindTimings {
    /// Reconstructing the weights into tensors.
    pub materialize: Duration,
    /// Constant propagation and plan building.
    pub bind: Duration,
}

fn tract_err(action: impl Into<String>) -> impl FnOnce(TractError) -> Error {
    let action = action.into();
    move |e| Error::Tract {
        action,
        message: format!("{e:#}"),
    }
}

fn datum_type(dtype: DType) -> Option<DatumType> {
    match dtype {
        DType::F32 => Some(DatumType::F32),
        DType::F16 => Some(DatumType::F16),
        DType::BF16 => None,
    }
}

fn to_usize_shape(shape: &[u64]) -> Option<Vec<usize>> {
    shape.iter().map(|&d| usize::try_from(d).ok()).collect()
}

/// Volume × element size, checked ([`crate::format::layout::tensor_bytes`]).
fn byte_len(dt: DatumType, shape: &[usize]) -> Option<usize> {
    crate::format::layout::tensor_bytes(dt.size_of(), shape)
}

/// Declutters and optimizes a typed graph (a tract panic is an error, not an abort).
fn optimize(graph: usize, mut model: TypedModel) -> Result<TypedModel, Error> {
    // tract picks its matrix kernels from here on: the precision cannot change any more.
    crate::runtime::compute::fix();
    catch_panic(graph, "optimizing the graph", || {
        model
            .declutter()
            .map_err(tract_err(format!("declutter graph {graph}")))?;
        model
            .optimize()
            .map_err(tract_err(format!("optimize graph {graph}")))?;
        Ok(model)
    })
}

/// Where binding puts each weight of the optimized model: the node of every weight input
/// (`sources`: bundle tensors by index and name, with their facts in `weights`; `shared`: the
/// ones every task reconstructs alike) and of every rewritten BatchNorm's slope and intercept.
/// A weight that optimization turned into something other than a model input is
/// [`Error::Unsupported`].
fn weight_slots(
    graph: usize,
    model: &TypedModel,
    (sources, weights, shared): (&[(usize, String)], &WeightFacts, &HashSet<usize>),
    bns: &[BnRewrite],
    bn_facts: Vec<(DatumType, Vec<usize>, usize)>,
) -> Result<Vec<WeightSource>, Error> {
    let source_node = |name: &str| -> Result<usize, Error> {
        let id = model
            .node_by_name(name)
            .map_err(tract_err(format!("find weight {name:?}")))?
            .id;
        if model.inputs.contains(&OutletId::new(id, 0)) {
            Ok(id)
        } else {
            Err(Error::Unsupported {
                graph,
                reason: format!("weight {name:?} is not an input of the optimized model"),
            })
        }
    };
    let mut slots = Vec::new();
    for (i, name) in sources {
        let Some((dt, shape, _)) = weights.get(i) else {
            continue;
        };
        let node = source_node(name)?;
        slots.push(WeightSource::Weight {
            tensor: *i,
            node,
            dt: *dt,
            shape: shape.clone(),
            fold: fold_chain(model, node),
            shared: shared.contains(i),
        });
    }
    for (bn, (dt, shape, channels)) in bns.iter().zip(bn_facts) {
        slots.push(WeightSource::BatchNorm(BatchNormSource {
            params: bn.params,
            epsilon: bn.epsilon,
            channels,
            dt,
            shape,
            slope: source_node(&bn.slope)?,
            intercept: source_node(&bn.intercept)?,
        }));
    }
    Ok(slots)
}

/// The model inputs that are data (not weights) and the outputs, as the engine reports and
/// checks them.
struct DataIo {
    data_inputs: Vec<OutletId>,
    inputs: Vec<IoInfo>,
    input_facts: Vec<TypedFact>,
    index_limits: Vec<IndexLimit>,
    outputs: Vec<IoInfo>,
}

impl DataIo {
    /// The data inputs of `model` (every input that no slot binds) and its outputs.
    fn of(model: &TypedModel, slots: &[WeightSource]) -> Result<DataIo, Error> {
        let weight_nodes: HashSet<usize> = slots
            .iter()
            .flat_map(|s| match s {
                WeightSource::Weight { node, .. } => vec![*node],
                WeightSource::BatchNorm(bn) => vec![bn.slope, bn.intercept],
            })
            .collect();
        let data_inputs: Vec<OutletId> = model
            .inputs
            .iter()
            .filter(|o| !weight_nodes.contains(&o.node))
            .copied()
            .collect();
        let mut input_facts = Vec::new();
        let mut inputs = Vec::new();
        for o in &data_inputs {
            let fact = model
                .outlet_fact(*o)
                .map_err(tract_err("read an input fact"))?
                .clone();
            let name = model.node(o.node).name.clone();
            inputs.push(IoInfo::from_fact(name, &fact));
            input_facts.push(fact);
        }
        let index_limits = guard::index_limits(model, &data_inputs);
        let mut outputs = Vec::new();
        for o in &model.outputs {
            let fact = model
                .outlet_fact(*o)
                .map_err(tract_err("read an output fact"))?;
            let name = model
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone());
            outputs.push(IoInfo::from_fact(name, fact));
        }
        Ok(DataIo {
            data_inputs,
            inputs,
            input_facts,
            index_limits,
            outputs,
        })
    }
}

/// Bytes of the weights a bound task holds (shared weights are the engine's, counted once
/// there; a BatchNorm has a slope and an intercept).
fn bound_bytes(slots: &[WeightSource]) -> usize {
    slots
        .iter()
        .map(|s| match s {
            WeightSource::Weight { shared: true, .. } => 0,
            WeightSource::Weight { dt, shape, .. } => byte_len(*dt, shape).unwrap_or(usize::MAX),
            WeightSource::BatchNorm(bn) => {
                byte_len(bn.dt, &bn.shape).map_or(usize::MAX, |b| b.saturating_mul(2))
            }
        })
        .fold(0usize, usize::saturating_add)
}

impl Template {
    /// Builds the template of `key` (parse, type, declutter, optimize: once per graph).
    /// `task` is any task using the template (it provides the shapes of private tensors).
    #[cfg(all(test, feature = "compiler"))]
    pub(crate) fn build(
        bundle: &Bundle,
        key: &TemplateKey,
        task: usize,
        used: &[usize],
        symbol_values: &[(String, usize)],
    ) -> Result<Template, Error> {
        Self::from_typed(Self::type_graph(bundle, key, task, used, symbol_values)?)
    }

    /// Parses and types the graph of `key` with task `task`'s weights (any task using the
    /// template: it provides the shapes of private tensors) declared: the first half of a
    /// template build, and the check of rules G5–G7 (docs/FORMAT.md).
    pub(crate) fn type_graph(
        bundle: &Bundle,
        key: &TemplateKey,
        task: usize,
        used: &[usize],
        symbol_values: &[(String, usize)],
    ) -> Result<TypedGraph, Error> {
        let manifest = bundle.manifest();
        let task_entry = manifest.tasks.get(task).ok_or(Error::OutOfRange {
            what: "task",
            index: task,
            count: manifest.tasks.len(),
        })?;
        let proto = decode_graph(bundle, key.graph)?;
        let mut decls = Vec::with_capacity(used.len());
        for &i in used {
            let (Some(entry), Some(module)) = (manifest.tensors.get(i), task_entry.tensors.get(i))
            else {
                return Err(Error::OutOfRange {
                    what: "tensor",
                    index: i,
                    count: manifest.tensors.len(),
                });
            };
            let shape = match module {
                TaskTensor::Private { shape, .. } => shape,
                TaskTensor::Merged { .. } | TaskTensor::Residual { .. } => &entry.shape,
            };
            decls.push(WeightDecl {
                index: i,
                name: entry.name.clone(),
                dtype: entry.dtype,
                shape: shape.clone(),
                // A constant is baked into the template, one copy per graph; a large one is
                // an input instead, reconstructed once per engine and shared by every graph's
                // plan (`SharedWeights`), like the tensors every task reconstructs alike.
                dynamic: !reconstruct::is_constant(manifest, i) || is_large(&entry.shape),
            });
        }
        let mut scratch = DecodeBuffers::default();
        let mut constant = |i: usize| -> Result<Vec<f32>, Error> {
            let mut values = Vec::new();
            reconstruct::task_tensor(bundle, task, i, &mut values, &mut scratch)?;
            Ok(values)
        };
        let mut typed = type_graph(proto, key.graph, &decls, &mut constant, symbol_values)?;
        typed.shared = used
            .iter()
            .copied()
            .filter(|&i| reconstruct::same_for_every_task(manifest, i))
            .collect();
        Ok(typed)
    }

    /// Completes a template from its typed graph, in three steps: declutter and optimize
    /// ([`optimize`]), find the weight inputs' nodes and fold chains ([`weight_slots`]), and
    /// describe the data inputs and outputs ([`DataIo::of`]).
    pub(crate) fn from_typed(typed: TypedGraph) -> Result<Template, Error> {
        let started = Instant::now();
        let TypedGraph {
            graph,
            model,
            sources,
            weights,
            bns,
            bn_facts,
            shared,
            parse,
            typing,
        } = typed;
        let model = optimize(graph, model)?;
        let optimized_at = started.elapsed();
        let slots = weight_slots(graph, &model, (&sources, &weights, &shared), &bns, bn_facts)?;
        let io = DataIo::of(&model, &slots)?;
        let prop_consts = needs_prop_consts(&model, &slots);
        let weight_bytes = bound_bytes(&slots);
        log::debug!(
            "template for graph {graph}: {} nodes, {} weight inputs ({weight_bytes} bytes), \
             {} BatchNorm rewritten, constant propagation at binding: {}; parse {:?}, type {:?}, \
             declutter and optimize {:?}",
            model.nodes.len(),
            slots.len(),
            bns.len(),
            prop_consts,
            parse,
            typing,
            optimized_at,
        );
        Ok(Template {
            graph,
            model,
            data_inputs: io.data_inputs,
            slots,
            inputs: io.inputs,
            input_facts: io.input_facts,
            index_limits: io.index_limits,
            outputs: io.outputs,
            weight_bytes,
            prop_consts,
            pool: Mutex::new(Vec::new()),
            folded: Mutex::new(HashMap::new()),
        })
    }

    /// The data inputs (not the weights), in graph order.
    pub(crate) fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }

    /// The outputs, in graph order.
    pub(crate) fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }

    /// Bytes of the weights a task of this template materializes (shared weights excluded:
    /// they are materialized once).
    pub(crate) fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Drops the pooled binding buffers (they are rebuilt by the next binding).
    pub(crate) fn release_buffers(&self) {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Checks `inputs` against the data inputs' types and shapes (a symbolic dimension matches
    /// any size, the same in every input), and the values of inputs that index a lookup table
    /// against its size.
    pub(crate) fn check_inputs(&self, task: &str, inputs: &[TValue]) -> Result<(), Error> {
        if inputs.len() != self.input_facts.len() {
            return Err(Error::InputCount {
                task: task.to_string(),
                expected: self.input_facts.len(),
                got: inputs.len(),
            });
        }
        for ((value, fact), info) in inputs.iter().zip(&self.input_facts).zip(&self.inputs) {
            let shape_ok = value.rank() == fact.rank()
                && value
                    .shape()
                    .iter()
                    .zip(fact.shape.iter())
                    .all(|(&got, want)| want.to_usize().map_or(true, |w| w == got));
            if value.datum_type() != fact.datum_type || !shape_ok {
                let dims: Vec<String> = fact.shape.iter().map(|d| d.to_string()).collect();
                let got: Vec<String> = value.shape().iter().map(|d| d.to_string()).collect();
                return Err(Error::InputMismatch {
                    task: task.to_string(),
                    name: info.name.clone(),
                    expected: format!("{:?} [{}]", fact.datum_type, dims.join(",")),
                    got: format!("{:?} [{}]", value.datum_type(), got.join(",")),
                });
            }
        }
        let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        guard::check_symbols(task, &self.input_facts, &names, inputs)?;
        guard::check_index_limits(task, &self.index_limits, &names, inputs)
    }
}
