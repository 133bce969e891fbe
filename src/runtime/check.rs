//! Graph checks: every stored graph must parse and fit the tensors the bundle gives it, before
//! anything runs it.
//!
//! Why: the format rules (docs/FORMAT.md §6, rules 1–30 and V1–V5) make a bundle safe to
//! *read*, but a stored graph is an ONNX model that tract parses, types and runs. A graph that
//! reads a name nothing produces, a private head of the wrong shape, a weight type tract lacks
//! or a hostile attribute (a stride of 0, a Flatten axis past the rank, a negative
//! ConstantOfShape) used to pass `verify` and then fail — or make tract panic — only when a task
//! ran. [`check_graphs`] (what `taskpack verify` runs after [`Bundle::verify`]) and
//! [`Engine::new`](super::Engine::new) apply the graph rules G1–G7 of docs/FORMAT.md up front
//! and report a [`GraphProblem`] naming the node, attribute or tensor:
//!
//! - G1–G4 need only the decoded ONNX protobuf (`check_model`, also run by the compiler on
//!   each checkpoint's graph);
//! - G5–G7 parse and type the graph with tract, once per template (graph and private shapes),
//!   every task's weights declared at their type and shape. `Engine::new` keeps the typed model
//!   and builds the task's template from it on first use, so the graph is parsed once. tract
//!   runs under `catch_unwind` as a backstop: a panic is [`GraphProblem::Panic`], not a crash.
//!
//! What the checks do not promise: that every input a caller gives runs (shapes are checked per
//! call), nor that a graph that computes a huge shape at run time (from its inputs, or through
//! `Range`) fits in memory; constant shapes of `ConstantOfShape` and `Expand` are capped (G4).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};

use crate::dtype::DType;
use crate::runtime::engine::IoInfo;
use crate::runtime::template::{self, Template, TemplateKey};
#[cfg(feature = "compiler")]
use crate::runtime::template::{TypedGraph, WeightDecl};
use crate::runtime::{Bundle, Error};

/// Most elements a `ConstantOfShape` or `Expand` with a constant shape may produce (2^28: 1 GiB
/// of `f32`), so that a hostile graph cannot make tract allocate terabytes while it folds
/// constants or runs (rule G4).
pub const MAX_CONSTANT_SHAPE_ELEMENTS: u64 = 1 << 28;

/// What is wrong with a stored graph (docs/FORMAT.md §6, rules G1–G7); carried by
/// [`Error::Graph`] with the graph's index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GraphProblem {
    /// G1: the section is not an ONNX model with a graph of at least one node.
    #[error("not an ONNX model: {reason}")]
    NotOnnx {
        /// What was wrong.
        reason: String,
    },
    /// G2: a node reads a name that nothing defines.
    #[error(
        "node {node:?} ({op}) reads {input:?}, which is neither a graph input, an initializer, \
         a tensor of the bundle nor a node output"
    )]
    UndefinedInput {
        /// The node's name (or `#index` and its first output when it has none).
        node: String,
        /// Its operator.
        op: String,
        /// The name it reads.
        input: String,
    },
    /// G2: a graph output that nothing defines.
    #[error(
        "graph output {output:?} is produced by no node and is neither a graph input, an \
         initializer nor a tensor of the bundle"
    )]
    UndefinedOutput {
        /// The output's name.
        output: String,
    },
    /// G3: a tensor of the bundle that a task's graph never reads.
    #[error("the graph of task {task:?} never reads tensor {tensor:?}")]
    UnreadTensor {
        /// The task.
        task: String,
        /// The tensor.
        tensor: String,
    },
    /// G4, G6: an attribute value tract cannot run (or would panic on).
    #[error("node {node:?} ({op}): attribute {attribute} = {value} is {reason}")]
    BadAttribute {
        /// The node's name (or `#index` and its first output when it has none).
        node: String,
        /// Its operator.
        op: String,
        /// The attribute.
        attribute: String,
        /// Its value, as written in the graph.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// G4: a `ConstantOfShape` or `Expand` whose constant shape has a negative dimension or
    /// asks for more than [`MAX_CONSTANT_SHAPE_ELEMENTS`] elements.
    #[error("node {node:?} ({op}): its shape {shape:?} (input {input:?}) {reason}")]
    BadShape {
        /// The node's name.
        node: String,
        /// Its operator.
        op: String,
        /// The shape input's name.
        input: String,
        /// The shape.
        shape: Vec<i64>,
        /// What is wrong with it.
        reason: String,
    },
    /// G5: a weight the graph reads has a type the runtime (tract) has no type for.
    #[error("tensor {tensor:?} is {}, which the runtime cannot run (f32 and f16 only)", dtype.name())]
    WeightType {
        /// The tensor.
        tensor: String,
        /// Its type.
        dtype: DType,
    },
    /// G8: a task's label names do not fit its graph's first output.
    #[error("task {task:?}: {reason}")]
    Labels {
        /// The task.
        task: String,
        /// What does not fit.
        reason: String,
    },
    /// G7: tract panicked on the graph (caught; the graph is refused).
    #[error("tract panicked while {stage}: {message}")]
    Panic {
        /// What tract was doing: `parsing the graph`, `typing the graph`...
        stage: String,
        /// The panic message.
        message: String,
    },
}

/// A node's name for messages: its name, or `#index` and its first output when it has none.
pub(crate) fn node_label(node: &NodeProto, index: usize) -> String {
    if !node.name.is_empty() {
        return node.name.clone();
    }
    match node.output.first() {
        Some(out) => format!("#{index} -> {out}"),
        None => format!("#{index}"),
    }
}

fn is_onnx_domain(node: &NodeProto) -> bool {
    node.domain.is_empty() || node.domain == "ai.onnx"
}

/// Operators with `kernel_shape`, `strides`, `dilations` and `pads` attributes.
const WINDOWED: [&str; 7] = [
    "Conv",
    "ConvTranspose",
    "ConvInteger",
    "QLinearConv",
    "MaxPool",
    "AveragePool",
    "LpPool",
];

/// Checks rules G1, G2 and G4 on a decoded model: a graph with nodes, every name read defined
/// (graph inputs, initializers, node outputs, enclosing scopes for subgraphs, or a weight:
/// `is_weight`), and the attributes of windowed operators and constant `ConstantOfShape` shapes
/// in range.
pub(crate) fn check_model(
    model: &ModelProto,
    is_weight: &dyn Fn(&str) -> bool,
) -> Result<(), GraphProblem> {
    let graph = model.graph.as_ref().ok_or_else(|| GraphProblem::NotOnnx {
        reason: "the protobuf has no graph".into(),
    })?;
    if graph.node.is_empty() {
        return Err(GraphProblem::NotOnnx {
            reason: "the graph has no nodes".into(),
        });
    }
    check_scope(graph, &Scope::default(), is_weight)
}

/// The names and constant initializers visible in a (sub)graph.
#[derive(Default, Clone)]
struct Scope<'a> {
    names: HashSet<&'a str>,
    constants: HashMap<&'a str, &'a TensorProto>,
}

fn check_scope<'a>(
    graph: &'a GraphProto,
    outer: &Scope<'a>,
    is_weight: &dyn Fn(&str) -> bool,
) -> Result<(), GraphProblem> {
    let mut scope = outer.clone();
    scope
        .names
        .extend(graph.input.iter().map(|i| i.name.as_str()));
    for t in &graph.initializer {
        scope.names.insert(t.name.as_str());
        scope.constants.insert(t.name.as_str(), t);
    }
    for s in &graph.sparse_initializer {
        if let Some(v) = &s.values {
            scope.names.insert(v.name.as_str());
        }
    }
    for node in &graph.node {
        scope.names.extend(
            node.output
                .iter()
                .filter(|o| !o.is_empty())
                .map(String::as_str),
        );
        if node.op_type == "Constant" && is_onnx_domain(node) {
            let value = node.attribute.iter().find(|a| a.name == "value");
            if let (Some(out), Some(t)) = (node.output.first(), value.and_then(|a| a.t.as_ref())) {
                scope.constants.insert(out.as_str(), t);
            }
        }
    }
    let defined = |name: &str| scope.names.contains(name) || is_weight(name);
    for (index, node) in graph.node.iter().enumerate() {
        if let Some(input) = node.input.iter().find(|i| !i.is_empty() && !defined(i)) {
            return Err(GraphProblem::UndefinedInput {
                node: node_label(node, index),
                op: node.op_type.clone(),
                input: input.clone(),
            });
        }
        check_attributes(node, index)?;
        // The shape input: ConstantOfShape's first, Expand's second.
        let shape_input = match node.op_type.as_str() {
            "ConstantOfShape" => node.input.first(),
            "Expand" => node.input.get(1),
            _ => None,
        };
        if let Some(input) = shape_input.filter(|_| is_onnx_domain(node)) {
            check_constant_shape(node, index, input, &scope)?;
        }
        for attr in &node.attribute {
            for sub in attr.g.iter().chain(&attr.graphs) {
                check_scope(sub, &scope, is_weight)?;
            }
        }
    }
    if let Some(output) = graph.output.iter().find(|o| !defined(&o.name)) {
        return Err(GraphProblem::UndefinedOutput {
            output: output.name.clone(),
        });
    }
    Ok(())
}

/// G4 for windowed operators: `kernel_shape`, `strides`, `dilations` ≥ 1, `group` ≥ 1,
/// `pads` ≥ 0, and, when `kernel_shape` is given, one stride and dilation per spatial axis and
/// two pads per spatial axis.
fn check_attributes(node: &NodeProto, index: usize) -> Result<(), GraphProblem> {
    if !is_onnx_domain(node) || !WINDOWED.contains(&node.op_type.as_str()) {
        return Ok(());
    }
    let bad = |attribute: &str, value: String, reason: String| GraphProblem::BadAttribute {
        node: node_label(node, index),
        op: node.op_type.clone(),
        attribute: attribute.to_string(),
        value,
        reason,
    };
    let ints = |name: &str| node.attribute.iter().find(|a| a.name == name);
    let kernel = ints("kernel_shape").map(|a| a.ints.len());
    for (name, min, per_axis) in [
        ("kernel_shape", 1, 1),
        ("strides", 1, 1),
        ("dilations", 1, 1),
        ("pads", 0, 2),
    ] {
        let Some(attr) = ints(name) else {
            continue;
        };
        if let Some(v) = attr.ints.iter().find(|&&v| v < min) {
            return Err(bad(
                name,
                format!("{:?}", attr.ints),
                format!("invalid: {v} is below {min}"),
            ));
        }
        if let Some(axes) = kernel {
            if attr.ints.len() != axes.saturating_mul(per_axis) {
                return Err(bad(
                    name,
                    format!("{:?}", attr.ints),
                    format!(
                        "invalid: {} values for {axes} spatial axes (kernel_shape)",
                        attr.ints.len()
                    ),
                ));
            }
        }
    }
    if let Some(group) = ints("group").filter(|a| a.i < 1) {
        return Err(bad("group", group.i.to_string(), "invalid: below 1".into()));
    }
    Ok(())
}

/// G4 for `ConstantOfShape`: a constant shape has no negative dimension and its element count
/// does not overflow.
fn check_constant_shape(
    node: &NodeProto,
    index: usize,
    input: &str,
    scope: &Scope<'_>,
) -> Result<(), GraphProblem> {
    let Some(shape) = scope.constants.get(input).and_then(|t| int64s(t)) else {
        return Ok(());
    };
    match constant_shape_problem(&shape) {
        None => Ok(()),
        Some(reason) => Err(GraphProblem::BadShape {
            node: node_label(node, index),
            op: node.op_type.clone(),
            input: input.to_string(),
            shape,
            reason,
        }),
    }
}

/// What rule G4 finds wrong with a constant shape: a negative dimension, or more than
/// [`MAX_CONSTANT_SHAPE_ELEMENTS`] elements. `None` if it is fine.
fn constant_shape_problem(shape: &[i64]) -> Option<String> {
    if shape.iter().any(|&d| d < 0) {
        return Some("has a negative dimension".into());
    }
    let elements = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d.unsigned_abs()));
    match elements {
        None => Some("has more elements than fit in 64 bits".into()),
        Some(n) if n > MAX_CONSTANT_SHAPE_ELEMENTS => Some(format!(
            "asks for {n} elements, more than the {MAX_CONSTANT_SHAPE_ELEMENTS} a graph may \
             create from a constant shape"
        )),
        Some(_) => None,
    }
}

/// The values of an `INT64` tensor (`int64_data` or little-endian `raw_data`), `None` for any
/// other type or malformed data.
fn int64s(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != DataType::Int64 as i32 {
        return None;
    }
    if !t.int64_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    let chunks = t.raw_data.chunks_exact(8);
    if !chunks.remainder().is_empty() {
        return None;
    }
    chunks
        .map(|c| <[u8; 8]>::try_from(c).ok().map(i64::from_le_bytes))
        .collect()
}

/// The templates of a bundle, as `Engine::new` assigns them: per task, the index of its template;
/// per template, its key, a task using it and the weights its graph reads.
pub(crate) struct TemplateMap {
    /// Per task, the index of its template slot.
    pub task_slot: Vec<usize>,
    /// `(key, a task using it, tensor indices its graph reads)` per template.
    pub slots: Vec<(TemplateKey, usize, Vec<usize>)>,
}

/// Checks rules G1–G4 on every graph of `bundle` (decoding each once) and assigns its templates.
pub(crate) fn template_map(bundle: &Bundle) -> Result<TemplateMap, Error> {
    let manifest = bundle.manifest();
    let by_name: HashMap<&str, usize> = manifest
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut used = Vec::with_capacity(manifest.graphs.len());
    for graph in 0..manifest.graphs.len() {
        let proto = template::decode_graph(bundle, graph)?;
        check_model(&proto, &|name| by_name.contains_key(name)).map_err(|problem| {
            Error::Graph {
                graph,
                problem: Box::new(problem),
            }
        })?;
        used.push(template::weights_read(&proto, &by_name));
    }
    let mut slots: Vec<(TemplateKey, usize, Vec<usize>)> = Vec::new();
    let mut task_slot = Vec::with_capacity(manifest.tasks.len());
    for (t, task) in manifest.tasks.iter().enumerate() {
        let graph = task.graph as usize;
        let graph_used = used.get(graph).ok_or(Error::OutOfRange {
            what: "graph",
            index: graph,
            count: manifest.graphs.len(),
        })?;
        // G3: `graph_used` is ascending and holds indices of `tensors` only, so a shorter list
        // misses one.
        if graph_used.len() != manifest.tensors.len() {
            let unread = manifest
                .tensors
                .iter()
                .enumerate()
                .find(|(i, _)| graph_used.binary_search(i).is_err());
            if let Some((_, tensor)) = unread {
                return Err(Error::Graph {
                    graph,
                    problem: Box::new(GraphProblem::UnreadTensor {
                        task: task.name.clone(),
                        tensor: tensor.name.clone(),
                    }),
                });
            }
        }
        let key = TemplateKey::for_task(task, graph_used);
        let slot = match slots.iter().position(|s| s.0 == key) {
            Some(s) => s,
            None => {
                slots.push((key, t, graph_used.clone()));
                slots.len() - 1
            }
        };
        task_slot.push(slot);
    }
    Ok(TemplateMap { task_slot, slots })
}

/// Checks that every graph of `bundle` can run with its tasks' tensors: rules G1–G8 of
/// docs/FORMAT.md (parses, every name defined, every tensor read, attributes in range, weight
/// types tract has, per template the graph types with tract, and label names fit the first
/// output). Reads the stored graphs and the weights no task changes (they are constants of the
/// templates). [`Engine::new`] runs the same checks but G8 (a task with mismatched label names
/// still runs on tensors; text classification reports [`Error::LabelCount`]); `taskpack verify`
/// runs this after [`Bundle::verify`].
///
/// [`Engine::new`]: super::Engine::new
pub fn check_graphs(bundle: &Bundle) -> Result<(), Error> {
    let map = template_map(bundle)?;
    let tasks = &bundle.manifest().tasks;
    for (slot, (key, task, used)) in map.slots.iter().enumerate() {
        let typed = Template::type_graph(bundle, key, *task, used, &[])?;
        let outputs = outputs(typed.model())?;
        let users = tasks
            .iter()
            .zip(&map.task_slot)
            .filter(|(_, s)| **s == slot);
        for (entry, _) in users {
            check_labels(&entry.name, entry.labels.len(), &outputs).map_err(|problem| {
                Error::Graph {
                    graph: key.graph,
                    problem: Box::new(problem),
                }
            })?;
        }
    }
    Ok(())
}

/// Rule G8: `labels` label names (0: none) fit the first output, `[batch, classes]` logits with
/// `classes == labels` (a symbolic class dimension is not checked).
pub(crate) fn check_labels(
    task: &str,
    labels: usize,
    outputs: &[IoInfo],
) -> Result<(), GraphProblem> {
    if labels == 0 {
        return Ok(());
    }
    let problem = |reason: String| GraphProblem::Labels {
        task: task.to_string(),
        reason,
    };
    let first = outputs
        .first()
        .ok_or_else(|| problem("it has label names but its graph has no output".into()))?;
    match first.shape.as_slice() {
        [_, Some(classes)] if *classes != labels => Err(problem(format!(
            "{labels} label names, but its first output {:?} has {classes} classes",
            first.name
        ))),
        [_, _] => Ok(()),
        shape => Err(problem(format!(
            "it has label names, but its first output {:?} has rank {}, not [batch, classes] \
             logits",
            first.name,
            shape.len()
        ))),
    }
}

/// One weight of a checkpoint's graph, for [`check_checkpoint_graph`].
#[cfg(feature = "compiler")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WeightInfo {
    /// The initializer's name.
    pub name: String,
    /// Its type.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<u64>,
}

/// Checks the (stripped) graph of task `task`'s checkpoint the way [`check_graphs`] checks a
/// stored one, with `weights` declared as model inputs: rules G1–G7 (G3: every weight is read).
/// Returns the graph's outputs. The compiler runs it to refuse a task whose bundle could not
/// run; errors are [`Error::Graph`] with graph index 0.
#[cfg(feature = "compiler")]
pub(crate) fn check_checkpoint_graph(
    task: &str,
    model: &ModelProto,
    weights: &[WeightInfo],
) -> Result<Vec<IoInfo>, Error> {
    let names: HashSet<&str> = weights.iter().map(|w| w.name.as_str()).collect();
    let graph_error = |problem| Error::Graph {
        graph: 0,
        problem: Box::new(problem),
    };
    check_model(model, &|name| names.contains(name)).map_err(graph_error)?;
    let read = model
        .graph
        .as_ref()
        .map(template::read_names)
        .unwrap_or_default();
    if let Some(w) = weights.iter().find(|w| !read.contains(&w.name)) {
        return Err(graph_error(GraphProblem::UnreadTensor {
            task: task.to_string(),
            tensor: w.name.clone(),
        }));
    }
    let decls: Vec<WeightDecl> = weights
        .iter()
        .enumerate()
        .map(|(index, w)| WeightDecl {
            index,
            name: w.name.clone(),
            dtype: w.dtype,
            shape: w.shape.clone(),
            dynamic: true,
        })
        .collect();
    let mut no_constant = |index: usize| -> Result<Vec<f32>, Error> {
        Err(Error::OutOfRange {
            what: "constant weight",
            index,
            count: 0,
        })
    };
    let typed: TypedGraph = template::type_graph(model.clone(), 0, &decls, &mut no_constant, &[])?;
    outputs(typed.model())
}

/// The outputs of a typed model, as [`IoInfo`]s.
fn outputs(model: &tract_onnx::prelude::TypedModel) -> Result<Vec<IoInfo>, Error> {
    model
        .outputs
        .iter()
        .map(|o| {
            let fact = model.outlet_fact(*o).map_err(|e| Error::Tract {
                action: "read an output fact".into(),
                message: format!("{e:#}"),
            })?;
            let name = model
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone());
            Ok(IoInfo::from_fact(name, fact))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::constant_shape_problem;

    /// The G4 cap at its boundary: 2^14 × 2^14 = 2^28 elements is allowed, one more row is not;
    /// an empty dimension and a scalar are fine; a product past 64 bits is refused as such.
    #[test]
    fn constant_shapes_at_the_cap() {
        assert_eq!(constant_shape_problem(&[1 << 14, 1 << 14]), None);
        assert_eq!(
            constant_shape_problem(&[(1 << 14) + 1, 1 << 14]).as_deref(),
            Some(
                "asks for 268451840 elements, more than the 268435456 a graph may create from a \
                 constant shape"
            )
        );
        assert_eq!(constant_shape_problem(&[0, i64::MAX]), None);
        assert_eq!(constant_shape_problem(&[]), None);
        assert_eq!(
            constant_shape_problem(&[1 << 40, 1 << 40]).as_deref(),
            Some("has more elements than fit in 64 bits")
        );
        assert_eq!(
            constant_shape_problem(&[3, -1]).as_deref(),
            Some("has a negative dimension")
        );
    }
}
