//! Templates: one optimized tract model per distinct graph, with the task-dependent weights left
//! as model inputs, and the binding of one task's weights into a copy of it.
//!
//! Why: parsing, decluttering and optimizing a model dominate the cost of loading it (DESIGN.md
//! §5), and none of that work depends on the values of the weights. A template does it once per
//! graph with every weight some task changes declared as a `TypedSource` of known type and shape,
//! and every weight no task changes (a merged tensor without delta) as a constant. Binding a task
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_core::optim::CONST_FOLD_MEM_BUDGET;
use tract_onnx::tract_hir::infer::*;
use tract_onnx::tract_hir::internal::{bail, DimLike, Factoid, StaticName};
use tract_onnx::tract_hir::ops::array::Flatten;
use tract_onnx::tract_hir::ops::expandable::{expand, Expansion};

use crate::dtype::DType;
use crate::format::manifest::{TaskEntry, TaskTensor, TensorStorage};
use crate::runtime::check::GraphProblem;
use crate::runtime::engine::IoInfo;
use crate::runtime::guard::{self, IndexLimit};
use crate::runtime::reconstruct::{self, Scratch};
use crate::runtime::{Bundle, Error};

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

/// Where one source of the template gets its value from at binding.
#[derive(Debug, Clone)]
enum Slot {
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
    },
    /// The slope and intercept replacing a `BatchNormalization` node.
    BatchNorm {
        /// Tensor indices of scale, bias, mean and variance.
        params: [usize; 4],
        epsilon: f32,
        channels: usize,
        dt: DatumType,
        /// `[1, C, 1, …]`.
        shape: Vec<usize>,
        slope: usize,
        intercept: usize,
    },
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
    slots: Vec<Slot>,
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

/// Names of every value the nodes of `graph` (and, recursively, of their subgraphs) read.
fn used_names(graph: &GraphProto, out: &mut HashSet<String>) {
    for node in &graph.node {
        out.extend(node.input.iter().filter(|n| !n.is_empty()).cloned());
        for attr in &node.attribute {
            attr.g.iter().for_each(|g| used_names(g, out));
            attr.graphs.iter().for_each(|g| used_names(g, out));
        }
    }
}

/// Names `graph` reads: the inputs of its nodes (and, recursively, of their subgraphs) and its
/// outputs (an output may be a weight or a graph input as it is).
pub(crate) fn read_names(graph: &GraphProto) -> HashSet<String> {
    let mut names = HashSet::new();
    used_names(graph, &mut names);
    names.extend(graph.output.iter().map(|o| o.name.clone()));
    names
}

/// Tensor indices (into `by_name`'s manifest) of the weights `proto` reads, ascending.
pub(crate) fn weights_read(proto: &ModelProto, by_name: &HashMap<&str, usize>) -> Vec<usize> {
    let names = proto.graph.as_ref().map(read_names).unwrap_or_default();
    let mut used: Vec<usize> = names
        .iter()
        .filter_map(|n| by_name.get(n.as_str()).copied())
        .collect();
    used.sort_unstable();
    used
}

/// Tensor indices (into the manifest) of the weights graph `graph` uses, ascending.
#[cfg(test)]
pub(crate) fn graph_weights(
    bundle: &Bundle,
    graph: usize,
    by_name: &HashMap<&str, usize>,
) -> Result<Vec<usize>, Error> {
    Ok(weights_read(&decode_graph(bundle, graph)?, by_name))
}

/// The stored graph `graph`, decoded ([`GraphProblem::NotOnnx`] if it is not an ONNX model).
pub(crate) fn decode_graph(bundle: &Bundle, graph: usize) -> Result<ModelProto, Error> {
    let manifest = bundle.manifest();
    let entry = manifest.graphs.get(graph).ok_or(Error::OutOfRange {
        what: "graph",
        index: graph,
        count: manifest.graphs.len(),
    })?;
    let bytes = bundle.section(entry.section)?;
    crate::onnx::decode_model(bytes).map_err(|e| Error::Graph {
        graph,
        problem: Box::new(GraphProblem::NotOnnx {
            reason: match e {
                crate::onnx::OnnxError::NotOnnx { reason } => reason,
                other => other.to_string(),
            },
        }),
    })
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

/// Volume × element size, checked.
fn byte_len(dt: DatumType, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(dt.size_of(), |acc, &d| acc.checked_mul(d))
}

/// A `BatchNormalization` node rewritten into `Add(intercept, Mul(slope, x))`.
#[derive(Debug)]
struct BnRewrite {
    x: String,
    params: [usize; 4],
    epsilon: f32,
    slope: String,
    intercept: String,
    node: String,
}

/// A name not in `taken`, derived from `base`, and reserved.
fn fresh_name(base: String, taken: &mut HashSet<String>) -> String {
    let mut name = base.clone();
    let mut i = 1u32;
    while taken.contains(&name) {
        name = format!("{base}.{i}");
        i = i.saturating_add(1);
    }
    taken.insert(name.clone());
    name
}

fn all_names(graph: &GraphProto) -> HashSet<String> {
    let mut names = HashSet::new();
    used_names(graph, &mut names);
    for node in &graph.node {
        names.extend(node.output.iter().cloned());
        names.insert(node.name.clone());
    }
    names.extend(graph.input.iter().map(|i| i.name.clone()));
    names.extend(graph.output.iter().map(|i| i.name.clone()));
    names
}

/// Rewrites the top-level `BatchNormalization` nodes whose parameters are all bundle weights, at
/// least one of them task-dependent (see the module docs). Nodes in subgraphs, in training mode,
/// or with parameters computed by the graph are left to tract.
fn rewrite_batchnorms(
    graph: &mut GraphProto,
    weight: impl Fn(&str) -> Option<usize>,
    dynamic: impl Fn(usize) -> bool,
) -> Vec<BnRewrite> {
    let mut taken = all_names(graph);
    let mut rewrites = Vec::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        match bn_rewrite(&node, &weight, &dynamic, &mut taken) {
            Some((rewrite, replacement)) => {
                rewrites.push(rewrite);
                nodes.extend(replacement);
            }
            None => nodes.push(node),
        }
    }
    graph.node = nodes;
    rewrites
}

fn bn_rewrite(
    node: &NodeProto,
    weight: &impl Fn(&str) -> Option<usize>,
    dynamic: &impl Fn(usize) -> bool,
    taken: &mut HashSet<String>,
) -> Option<(BnRewrite, [NodeProto; 2])> {
    if node.op_type != "BatchNormalization" || !(node.domain.is_empty() || node.domain == "ai.onnx")
    {
        return None;
    }
    let [x, scale, bias, mean, var] = node.input.as_slice() else {
        return None;
    };
    let (out, rest) = node.output.split_first()?;
    if out.is_empty() || rest.iter().any(|o| !o.is_empty()) {
        return None;
    }
    let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
    if attr("training_mode").is_some_and(|a| a.i != 0) {
        return None;
    }
    let epsilon = match attr("epsilon") {
        Some(a) if a.r#type == AttributeType::Float as i32 || a.f != 0.0 => a.f,
        _ => 1e-5,
    };
    let params = [weight(scale)?, weight(bias)?, weight(mean)?, weight(var)?];
    if !params.iter().any(|&p| dynamic(p)) {
        return None;
    }
    let base = if node.name.is_empty() {
        out.clone()
    } else {
        node.name.clone()
    };
    let slope = fresh_name(format!("{base}.taskpack.slope"), taken);
    let intercept = fresh_name(format!("{base}.taskpack.intercept"), taken);
    let product = fresh_name(format!("{base}.taskpack.mul"), taken);
    let mul_name = fresh_name(format!("{base}.mul"), taken);
    let mul = NodeProto {
        input: vec![slope.clone(), x.clone()],
        output: vec![product.clone()],
        name: mul_name,
        op_type: "Mul".into(),
        ..Default::default()
    };
    let add = NodeProto {
        input: vec![intercept.clone(), product],
        output: vec![out.clone()],
        name: base.clone(),
        op_type: "Add".into(),
        ..Default::default()
    };
    Some((
        BnRewrite {
            x: x.clone(),
            params,
            epsilon,
            slope,
            intercept,
            node: base,
        },
        [mul, add],
    ))
}

/// One weight a graph reads, as it is declared to tract: its type and shape, and whether some
/// task changes it (a model input of the template) or not (a constant of the template).
#[derive(Debug, Clone)]
pub(crate) struct WeightDecl {
    /// Index of the tensor in the manifest (or in the compiler's tensor list).
    pub index: usize,
    /// The ONNX name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (the task's shape for a private tensor).
    pub shape: Vec<u64>,
    /// Whether some task changes it.
    pub dynamic: bool,
}

/// A graph parsed and typed by tract for one template, before declutter and optimization: what
/// `Engine::new` and [`crate::runtime::check::check_graphs`] check up front (docs/FORMAT.md
/// rules G5–G7), and what [`Template::from_typed`] continues from, so that a graph is parsed and
/// typed once.
pub(crate) struct TypedGraph {
    graph: usize,
    model: TypedModel,
    /// `(tensor index, name)` of the weights left as model inputs.
    sources: Vec<(usize, String)>,
    /// Type, shape and kind (dynamic or not) of every weight the graph reads.
    weights: BTreeMap<usize, (DatumType, Vec<usize>, bool)>,
    bns: Vec<BnRewrite>,
    /// Per rewritten BatchNorm: type and shape of its slope and intercept, and its channels.
    bn_facts: Vec<(DatumType, Vec<usize>, usize)>,
    parse: Duration,
    typing: Duration,
}

impl std::fmt::Debug for TypedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedGraph")
            .field("graph", &self.graph)
            .field("nodes", &self.model.nodes.len())
            .field("weights", &self.weights.len())
            .finish_non_exhaustive()
    }
}

impl TypedGraph {
    /// The typed model (weights as inputs or constants, BatchNorms rewritten).
    pub(crate) fn model(&self) -> &TypedModel {
        &self.model
    }
}

/// Runs `f`, turning a panic inside it (tract asserts on some malformed graphs) into
/// [`GraphProblem::Panic`] for graph `graph`.
pub(crate) fn catch_panic<T>(
    graph: usize,
    stage: &str,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        Err(Error::Graph {
            graph,
            problem: Box::new(GraphProblem::Panic {
                stage: stage.to_string(),
                message,
            }),
        })
    })
}

/// Parses and types `proto` (graph `graph_index`) with the weights `decls` declared at their type
/// and shape: dynamic weights as model inputs, the others as constants whose values `constant`
/// gives (by tensor index). BatchNorms with a dynamic parameter are rewritten first (module
/// docs). tract runs under [`catch_panic`]; a Flatten axis outside its input's rank is reported
/// as [`GraphProblem::BadAttribute`].
pub(crate) fn type_graph(
    mut proto: ModelProto,
    graph_index: usize,
    decls: &[WeightDecl],
    constant: &mut dyn FnMut(usize) -> Result<Vec<f32>, Error>,
    symbol_values: &[(String, usize)],
) -> Result<TypedGraph, Error> {
    let started = Instant::now();
    let unsupported = |reason: String| Error::Unsupported {
        graph: graph_index,
        reason,
    };
    let problem = |problem: GraphProblem| Error::Graph {
        graph: graph_index,
        problem: Box::new(problem),
    };

    // Type, shape and kind of every weight the graph uses.
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    let mut weights: BTreeMap<usize, (DatumType, Vec<usize>, bool)> = BTreeMap::new();
    for decl in decls {
        let dt = datum_type(decl.dtype).ok_or_else(|| {
            problem(GraphProblem::WeightType {
                tensor: decl.name.clone(),
                dtype: decl.dtype,
            })
        })?;
        let shape = to_usize_shape(&decl.shape)
            .filter(|s| byte_len(dt, s).is_some())
            .ok_or_else(|| unsupported(format!("weight {:?} is too large", decl.name)))?;
        by_name.insert(decl.name.as_str(), decl.index);
        weights.insert(decl.index, (dt, shape, decl.dynamic));
    }
    let Some(graph) = proto.graph.as_mut() else {
        return Err(problem(GraphProblem::NotOnnx {
            reason: "the protobuf has no graph".into(),
        }));
    };

    let bns = rewrite_batchnorms(
        graph,
        |name| by_name.get(name).copied(),
        |i| weights.get(&i).is_some_and(|w| w.2),
    );
    // Weights still read after the rewrite (a BatchNorm's parameters may be read only by it).
    let names = read_names(graph);
    let mut sources: Vec<(usize, String)> = Vec::new();
    for decl in decls {
        let Some((_, shape, dynamic)) = weights.get(&decl.index) else {
            continue;
        };
        if !names.contains(&decl.name) {
            continue;
        }
        if *dynamic {
            sources.push((decl.index, decl.name.clone()));
            continue;
        }
        // A constant: the same for every task, so part of the template.
        let values = constant(decl.index)?;
        let mut raw = Vec::new();
        decl.dtype.encode(&values, &mut raw);
        let dims = shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| unsupported(format!("weight {:?} is too large", decl.name)))?;
        graph.initializer.push(TensorProto {
            dims,
            data_type: crate::onnx::onnx_data_type(decl.dtype),
            name: decl.name.clone(),
            raw_data: raw,
            ..Default::default()
        });
    }
    let flattens = flatten_axes(graph);

    let onnx = onnx_parser();
    let parsed = catch_panic(graph_index, "parsing the graph", || {
        onnx.parse(&proto, None)
            .map_err(tract_err(format!("parse graph {graph_index}")))
    })?;
    let mut model = parsed.model;
    if !symbol_values.is_empty() {
        let mut subs = HashMap::new();
        for (name, value) in symbol_values {
            let value = i64::try_from(*value)
                .map_err(|_| unsupported(format!("symbol {name} = {value} is too large")))?;
            if let Some(symbol) = model.symbols.get(name) {
                subs.insert(symbol, TDim::Val(value));
            }
        }
        model
            .set_symbols(&subs)
            .map_err(tract_err(format!("fix the symbols of graph {graph_index}")))?;
    }
    let outlet = |name: &str| {
        parsed
            .outlets_by_name
            .get(name)
            .copied()
            .ok_or_else(|| unsupported(format!("tract did not create an input for {name:?}")))
    };
    let bn_names: HashSet<&str> = bns
        .iter()
        .flat_map(|b| [b.slope.as_str(), b.intercept.as_str()])
        .collect();
    if let Some(name) = parsed
        .unresolved_inputs
        .iter()
        .find(|n| !bn_names.contains(n.as_str()) && !sources.iter().any(|(_, s)| s == *n))
    {
        return Err(unsupported(format!(
            "the graph reads {name:?}, which is neither a graph input nor a weight of the bundle"
        )));
    }
    for (i, name) in &sources {
        let Some((dt, shape, _)) = weights.get(i) else {
            continue;
        };
        model
            .set_outlet_fact(outlet(name)?, InferenceFact::dt_shape(*dt, shape.clone()))
            .map_err(tract_err(format!("declare weight {name:?}")))?;
    }

    // Shape analysis: the rank and type of each BatchNorm input, and of each Flatten input. A
    // Flatten axis past the rank makes tract panic (it slices the shape), so the axes are checked
    // against the ranks whatever the outcome, before reporting a failure.
    let analysed = catch_panic(graph_index, "analysing the graph", || {
        model
            .analyse(false)
            .map_err(tract_err(format!("analyse graph {graph_index}")))
    });
    for (node, input, axis) in &flattens {
        let rank = parsed
            .outlets_by_name
            .get(input)
            .and_then(|o| model.outlet_fact(*o).ok())
            .and_then(|f| f.shape.rank().concretize());
        // tract leaves the facts of a failed analysis partial: the checked Flatten's own error
        // names the axis then.
        let failed_here = matches!(&analysed, Err(Error::Tract { message, .. })
            if message.contains(&format!("Flatten axis {axis} is outside")));
        if rank.is_none() && failed_here {
            return Err(problem(GraphProblem::BadAttribute {
                node: node.clone(),
                op: "Flatten".into(),
                attribute: "axis".into(),
                value: axis.to_string(),
                reason: "outside the rank of its input".into(),
            }));
        }
        if let Some(rank) = rank {
            if *axis < -rank || *axis > rank {
                return Err(problem(GraphProblem::BadAttribute {
                    node: node.clone(),
                    op: "Flatten".into(),
                    attribute: "axis".into(),
                    value: axis.to_string(),
                    reason: format!("outside [-{rank}, {rank}] for an input of rank {rank}"),
                }));
            }
        }
    }
    analysed?;

    let mut bn_facts = Vec::new();
    for bn in &bns {
        let fact = model
            .outlet_fact(outlet(&bn.x)?)
            .map_err(tract_err("read a BatchNormalization input"))?;
        let rank = fact
            .shape
            .rank()
            .concretize()
            .and_then(|r| usize::try_from(r).ok())
            .filter(|&r| r >= 2);
        let dt = fact.datum_type.concretize();
        let (Some(rank), Some(dt @ (DatumType::F32 | DatumType::F16))) = (rank, dt) else {
            return Err(unsupported(format!(
                "cannot infer a float input of rank ≥ 2 for BatchNormalization {:?}",
                bn.node
            )));
        };
        let channels = bn
            .params
            .iter()
            .map(|p| weights.get(p).map(|w| w.1.as_slice()));
        let channels: Option<Vec<&[usize]>> = channels.collect();
        let channels = match channels.as_deref() {
            Some([[c], rest @ ..]) if rest.iter().all(|s| *s == [*c]) => *c,
            _ => {
                return Err(unsupported(format!(
                    "BatchNormalization {:?}: parameters are not four vectors of one length",
                    bn.node
                )))
            }
        };
        let mut shape = vec![1usize; rank];
        if let Some(c) = shape.get_mut(1) {
            *c = channels;
        }
        for name in [&bn.slope, &bn.intercept] {
            model
                .set_outlet_fact(outlet(name)?, InferenceFact::dt_shape(dt, shape.clone()))
                .map_err(tract_err(format!("declare {name:?}")))?;
        }
        bn_facts.push((dt, shape, channels));
    }

    let parse = started.elapsed();
    let model = catch_panic(graph_index, "typing the graph", || {
        model
            .into_typed()
            .map_err(tract_err(format!("type graph {graph_index}")))
    });
    if let Err(Error::Tract { message, .. }) = &model {
        // The checked Flatten fails the typing with its axis named (rule G6).
        let bad = flattens
            .iter()
            .find(|(_, _, axis)| message.contains(&format!("Flatten axis {axis} is outside")));
        if let Some((node, _, axis)) = bad {
            return Err(problem(GraphProblem::BadAttribute {
                node: node.clone(),
                op: "Flatten".into(),
                attribute: "axis".into(),
                value: axis.to_string(),
                reason: "outside the rank of its input".into(),
            }));
        }
    }
    let model = model?;
    Ok(TypedGraph {
        graph: graph_index,
        model,
        sources,
        weights,
        bns,
        bn_facts,
        parse,
        typing: started.elapsed().saturating_sub(parse),
    })
}

/// tract's `Flatten` with its axis checked against the input's rank: tract's own slices the shape
/// with the axis and panics past the rank (rule G6); this one fails the analysis instead, and
/// [`type_graph`] names the node.
#[derive(Debug, Clone, Hash)]
struct CheckedFlatten {
    axis: i64,
}

impl Expansion for CheckedFlatten {
    fn name(&self) -> StaticName {
        "Flatten".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.given(&inputs[0].shape, move |s, shape| {
            let rank = i64::try_from(shape.len())?;
            if self.axis < -rank || self.axis > rank {
                bail!(
                    "Flatten axis {} is outside [-{rank}, {rank}] for an input of rank {rank}",
                    self.axis
                );
            }
            let [rows, columns] = Flatten::new(self.axis).compute_shape(&shape)?;
            s.equals(&outputs[0].shape, ShapeFactoid::from(vec![rows, columns]))
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let rank = model.outlet_fact(inputs[0])?.rank();
        let rank = i64::try_from(rank)?;
        if self.axis < -rank || self.axis > rank {
            bail!("Flatten axis {} is outside [-{rank}, {rank}]", self.axis);
        }
        Expansion::wire(&Flatten::new(self.axis), prefix, model, inputs)
    }
}

/// The ONNX parser of [`CheckedFlatten`].
fn checked_flatten(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let axis: i64 = node.get_attr_opt("axis")?.unwrap_or(1);
    Ok((expand(CheckedFlatten { axis }), vec![]))
}

/// tract's ONNX parser, with the operators it would panic on replaced by checked ones.
fn onnx_parser() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register.insert("Flatten", checked_flatten);
    onnx
}

/// `(node, input, axis)` of every top-level `Flatten` node (axis 1 when not given).
fn flatten_axes(graph: &GraphProto) -> Vec<(String, String, i64)> {
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "Flatten" && (n.domain.is_empty() || n.domain == "ai.onnx"))
        .filter_map(|(i, n)| {
            let input = n.input.first()?.clone();
            let axis = n
                .attribute
                .iter()
                .find(|a| a.name == "axis")
                .map_or(1, |a| a.i);
            Some((crate::runtime::check::node_label(n, i), input, axis))
        })
        .collect()
}

impl Template {
    /// Builds the template of `key` (parse, type, declutter, optimize: once per graph).
    /// `task` is any task using the template (it provides the shapes of private tensors).
    #[cfg(test)]
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
                TaskTensor::Merged { .. } => &entry.shape,
            };
            decls.push(WeightDecl {
                index: i,
                name: entry.name.clone(),
                dtype: entry.dtype,
                shape: shape.clone(),
                dynamic: !matches!(entry.storage, TensorStorage::Merged { delta: None, .. }),
            });
        }
        let mut scratch = Scratch::default();
        let mut constant = |i: usize| -> Result<Vec<f32>, Error> {
            let mut values = Vec::new();
            reconstruct::task_tensor(bundle, task, i, &mut values, &mut scratch)?;
            Ok(values)
        };
        type_graph(proto, key.graph, &decls, &mut constant, symbol_values)
    }

    /// Completes a template from its typed graph: declutter, optimize, and find the weight
    /// inputs' nodes and fold chains.
    pub(crate) fn from_typed(typed: TypedGraph) -> Result<Template, Error> {
        let started = Instant::now();
        let TypedGraph {
            graph: graph_index,
            model: mut typed,
            sources,
            weights,
            bns,
            bn_facts,
            parse,
            typing,
        } = typed;
        let unsupported = |reason: String| Error::Unsupported {
            graph: graph_index,
            reason,
        };
        let typed = catch_panic(graph_index, "optimizing the graph", || {
            typed
                .declutter()
                .map_err(tract_err(format!("declutter graph {graph_index}")))?;
            typed
                .optimize()
                .map_err(tract_err(format!("optimize graph {graph_index}")))?;
            Ok(typed)
        })?;
        let optimized_at = started.elapsed();

        let source_node = |typed: &TypedModel, name: &str| -> Result<usize, Error> {
            let id = typed
                .node_by_name(name)
                .map_err(tract_err(format!("find weight {name:?}")))?
                .id;
            if typed.inputs.contains(&OutletId::new(id, 0)) {
                Ok(id)
            } else {
                Err(unsupported(format!(
                    "weight {name:?} is not an input of the optimized model"
                )))
            }
        };
        let mut slots = Vec::new();
        for (i, name) in &sources {
            let Some((dt, shape, _)) = weights.get(i) else {
                continue;
            };
            let node = source_node(&typed, name)?;
            slots.push(Slot::Weight {
                tensor: *i,
                node,
                dt: *dt,
                shape: shape.clone(),
                fold: fold_chain(&typed, node),
            });
        }
        for (bn, (dt, shape, channels)) in bns.iter().zip(bn_facts) {
            slots.push(Slot::BatchNorm {
                params: bn.params,
                epsilon: bn.epsilon,
                channels,
                dt,
                shape,
                slope: source_node(&typed, &bn.slope)?,
                intercept: source_node(&typed, &bn.intercept)?,
            });
        }
        let weight_nodes: HashSet<usize> = slots
            .iter()
            .flat_map(|s| match s {
                Slot::Weight { node, .. } => vec![*node],
                Slot::BatchNorm {
                    slope, intercept, ..
                } => vec![*slope, *intercept],
            })
            .collect();
        let prop_consts = needs_prop_consts(&typed, &slots);
        let data_inputs: Vec<OutletId> = typed
            .inputs
            .iter()
            .filter(|o| !weight_nodes.contains(&o.node))
            .copied()
            .collect();
        let mut input_facts = Vec::new();
        let mut inputs = Vec::new();
        for o in &data_inputs {
            let fact = typed
                .outlet_fact(*o)
                .map_err(tract_err("read an input fact"))?
                .clone();
            let name = typed.node(o.node).name.clone();
            inputs.push(IoInfo::from_fact(name, &fact));
            input_facts.push(fact);
        }
        let index_limits = guard::index_limits(&typed, &data_inputs);
        let mut outputs = Vec::new();
        for o in &typed.outputs {
            let fact = typed
                .outlet_fact(*o)
                .map_err(tract_err("read an output fact"))?;
            let name = typed
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| typed.node(o.node).name.clone());
            outputs.push(IoInfo::from_fact(name, fact));
        }
        let weight_bytes = slots
            .iter()
            .map(|s| match s {
                Slot::Weight { dt, shape, .. } => byte_len(*dt, shape).unwrap_or(usize::MAX),
                Slot::BatchNorm { dt, shape, .. } => {
                    byte_len(*dt, shape).map_or(usize::MAX, |b| b.saturating_mul(2))
                }
            })
            .fold(0usize, usize::saturating_add);
        log::debug!(
            "template for graph {graph_index}: {} nodes, {} weight inputs ({weight_bytes} bytes), \
             {} BatchNorm rewritten, constant propagation at binding: {}; parse {:?}, type {:?}, \
             declutter and optimize {:?}",
            typed.nodes.len(),
            slots.len(),
            bns.len(),
            prop_consts,
            parse,
            typing,
            optimized_at,
        );
        Ok(Template {
            graph: graph_index,
            model: typed,
            data_inputs,
            slots,
            inputs,
            input_facts,
            index_limits,
            outputs,
            weight_bytes,
            prop_consts,
            pool: Mutex::new(Vec::new()),
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

    /// Bytes of the weights a task of this template materializes.
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

    /// Materializes task `task`'s weights and binds them into a copy of the template.
    pub(crate) fn bind(
        &self,
        bundle: &Bundle,
        task: usize,
        task_name: &str,
    ) -> Result<(Plan, BindTimings), Error> {
        let mut buffers = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        let result = self.bind_with(bundle, task, task_name, &mut buffers, true);
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buffers);
        result
    }

    /// [`Template::bind`] with the given buffers; `eager: false` leaves every fold to tract's
    /// constant propagation (for tests: both must give the same plan).
    fn bind_with(
        &self,
        bundle: &Bundle,
        task: usize,
        task_name: &str,
        buffers: &mut Buffers,
        eager: bool,
    ) -> Result<(Plan, BindTimings), Error> {
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
        for slot in &self.slots {
            match slot {
                Slot::Weight {
                    tensor,
                    node,
                    dt,
                    shape,
                    fold,
                } => {
                    let reconstructing = Instant::now();
                    let weight =
                        self.reconstruct(bundle, task, *tensor, *dt, shape, tensors, values)?;
                    materialize += reconstructing.elapsed();
                    let weight = Arc::new(weight);
                    let fold = if eager { fold.as_slice() } else { &[] };
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
                Slot::BatchNorm {
                    params: ids,
                    epsilon,
                    channels,
                    dt,
                    shape,
                    slope,
                    intercept,
                } => {
                    let reconstructing = Instant::now();
                    for (id, out) in ids.iter().zip(params.iter_mut()) {
                        out.clear();
                        out.resize(*channels, 0.0);
                        reconstruct::task_tensor_into(bundle, task, *id, out)?;
                    }
                    let [gamma, beta, mean, var] = &*params;
                    let [a, b] = derived;
                    batchnorm_affine(gamma, beta, mean, var, *epsilon, a, b);
                    let ta = Arc::new(self.fill(tensors, *slope, *dt, shape, a)?);
                    let tb = Arc::new(self.fill(tensors, *intercept, *dt, shape, b)?);
                    materialize += reconstructing.elapsed();
                    replace_by_const(&mut model, *slope, Arc::clone(&ta), &action)?;
                    replace_by_const(&mut model, *intercept, Arc::clone(&tb), &action)?;
                    lent.extend([ta, tb]);
                }
            }
        }
        model.inputs.clone_from(&self.data_inputs);
        // Without constant propagation the folded weights' sources and chains stay in the model,
        // no longer reachable from its outputs: the plan runs only what the outputs need, and
        // compacting would cost ≈ 0.3 ms per MiniLM switch for nothing.
        if prop_consts {
            model.prop_consts().map_err(tract_err(action()))?;
        }
        let plan = model.into_runnable().map_err(tract_err(action()))?;
        // Take back the tensors constant propagation consumed.
        for t in lent {
            if let Ok(t) = Arc::try_unwrap(t) {
                give_back(tensors, t);
            }
        }
        let timings = BindTimings {
            materialize,
            bind: started.elapsed().saturating_sub(materialize),
        };
        Ok((plan, timings))
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
fn fold_chain(model: &TypedModel, source: usize) -> Vec<usize> {
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
fn needs_prop_consts(model: &TypedModel, slots: &[Slot]) -> bool {
    let mut bound: HashSet<usize> = HashSet::new();
    for slot in slots {
        match slot {
            Slot::Weight { node, fold, .. } => {
                bound.insert(*node);
                bound.extend(fold.iter().copied());
            }
            Slot::BatchNorm {
                slope, intercept, ..
            } => {
                bound.extend([*slope, *intercept]);
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

/// tract's lowering of an inference-mode BatchNormalization, in `f32`:
/// `slope = γ / √(var + ε)`, `intercept = β − (mean · γ) / √(var + ε)`.
fn batchnorm_affine(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f32,
    slope: &mut Vec<f32>,
    intercept: &mut Vec<f32>,
) {
    slope.clear();
    intercept.clear();
    for (((g, b), m), v) in gamma.iter().zip(beta).zip(mean).zip(var) {
        let denominator = (v + epsilon).sqrt();
        slope.push(g / denominator);
        intercept.push(b - (m * g) / denominator);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::AttributeProto;

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn rewrites_only_task_dependent_batchnorms() {
        let mut g = GraphProto {
            node: vec![
                node("Conv", &["x", "w"], "c"),
                node("BatchNormalization", &["c", "s", "b", "m", "v"], "y"),
                node("BatchNormalization", &["y", "s2", "b2", "m2", "v2"], "z"),
                node(
                    "BatchNormalization",
                    &["z", "s", "b", "computed", "v"],
                    "out",
                ),
            ],
            ..Default::default()
        };
        g.node[1].attribute.push(AttributeProto {
            name: "epsilon".into(),
            f: 1e-3,
            r#type: AttributeType::Float as i32,
            ..Default::default()
        });
        let weights = ["w", "s", "b", "m", "v", "s2", "b2", "m2", "v2"];
        let index = |n: &str| weights.iter().position(|w| *w == n);
        // Only `m` (index 3) is task-dependent: the first node is rewritten, the second is all
        // constant, the third has a parameter the graph computes.
        let rewrites = rewrite_batchnorms(&mut g, index, |i| i == 3);
        assert_eq!(rewrites.len(), 1);
        let r = &rewrites[0];
        assert_eq!(r.params, [1, 2, 3, 4]);
        assert_eq!(r.epsilon, 1e-3);
        assert_eq!(r.x, "c");
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Conv",
                "Mul",
                "Add",
                "BatchNormalization",
                "BatchNormalization"
            ]
        );
        assert_eq!(g.node[1].input, vec![r.slope.clone(), "c".to_string()]);
        assert_eq!(g.node[2].input[0], r.intercept);
        assert_eq!(g.node[2].input[1], g.node[1].output[0]);
        assert_eq!(g.node[2].output, vec!["y".to_string()]);
    }

    /// Folding each weight's chain as it is reconstructed gives the plan tract's constant
    /// propagation gives: the same outputs, bit for bit, on every demo task.
    #[cfg(feature = "compiler")]
    #[test]
    fn eager_folding_matches_constant_propagation() {
        use crate::compile::{compile, CompileOptions};
        use crate::merge::Method;

        let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
        let tasks: Vec<(String, std::path::PathBuf)> = ["digits", "mnist", "parity"]
            .iter()
            .map(|t| (t.to_string(), demo.join(format!("{t}.onnx"))))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("demo.tpk");
        let opts = CompileOptions::new(demo.join("base.onnx"), tasks, Method::Emr, &out);
        drop(compile(&opts, &mut |_| {}).unwrap());
        let bundle = Bundle::read(&out).unwrap();
        let m = bundle.manifest();
        let by_name: HashMap<&str, usize> = m
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
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
                .filter(|s| matches!(s, Slot::Weight { fold, .. } if !fold.is_empty()))
                .count();
            let mut outputs = Vec::new();
            for eager in [true, false] {
                let mut buffers = Buffers::default();
                let (plan, _) = template
                    .bind_with(&bundle, task, &entry.name, &mut buffers, eager)
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

    #[test]
    fn batchnorm_affine_matches_the_definition() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        batchnorm_affine(&[2.0], &[1.0], &[3.0], &[3.0], 1.0, &mut a, &mut b);
        // y = 2 (x − 3) / 2 + 1 = x − 2.
        assert_eq!(a, [1.0]);
        assert_eq!(b, [-2.0]);
    }
}
