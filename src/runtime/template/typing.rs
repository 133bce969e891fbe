//! The first half of a template build: the weights declared at their type and shape (task-
//! dependent ones as model inputs, the others as constants), BatchNorms rewritten, and the graph
//! parsed and typed by tract, under a panic guard. What `Engine::new` and `check_graphs` check.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use tract_onnx::model::ParseResult;
use tract_onnx::pb::{GraphProto, ModelProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::*;

use super::batchnorm::{rewrite_batchnorms, BnRewrite};
use super::flatten::{flatten_axes, onnx_parser};
use super::stored::read_names;
use super::{byte_len, datum_type, to_usize_shape, tract_err};
use crate::dtype::DType;
use crate::runtime::check::GraphProblem;
use crate::runtime::Error;

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
    pub(super) graph: usize,
    pub(super) model: TypedModel,
    /// `(tensor index, name)` of the weights left as model inputs.
    pub(super) sources: Vec<(usize, String)>,
    /// Type, shape and kind (dynamic or not) of every weight the graph reads.
    pub(super) weights: WeightFacts,
    pub(super) bns: Vec<BnRewrite>,
    /// Per rewritten BatchNorm: type and shape of its slope and intercept, and its channels.
    pub(super) bn_facts: Vec<(DatumType, Vec<usize>, usize)>,
    /// Tensor indices of the input weights every task reconstructs alike (filled by
    /// `Template::type_graph`, which has the manifest).
    pub(super) shared: HashSet<usize>,
    pub(super) parse: Duration,
    pub(super) typing: Duration,
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
///
/// The steps: [`weight_facts`], the BatchNorm rewrite, [`add_constants`], [`parse`],
/// [`declare_sources`], [`analyse`], [`declare_batchnorm_inputs`], [`into_typed`].
pub(crate) fn type_graph(
    mut proto: ModelProto,
    graph_index: usize,
    decls: &[WeightDecl],
    constant: &mut dyn FnMut(usize) -> Result<Vec<f32>, Error>,
    symbol_values: &[(String, usize)],
) -> Result<TypedGraph, Error> {
    let started = Instant::now();
    let errors = Errors(graph_index);
    let (by_name, weights) = weight_facts(decls, errors)?;
    let Some(graph) = proto.graph.as_mut() else {
        return Err(errors.problem(GraphProblem::NotOnnx {
            reason: "the protobuf has no graph".into(),
        }));
    };
    let bns = rewrite_batchnorms(
        graph,
        |name| by_name.get(name).copied(),
        |i| weights.get(&i).is_some_and(|w| w.2),
    );
    let sources = add_constants(graph, decls, &weights, constant, errors)?;
    let flattens = flatten_axes(graph);

    let mut parsed = parse(&proto, symbol_values, errors)?;
    declare_sources(&mut parsed, &sources, &weights, &bns, errors)?;
    analyse(&mut parsed, &flattens, errors)?;
    let bn_facts = declare_batchnorm_inputs(&mut parsed, &bns, &weights, errors)?;
    let parse = started.elapsed();
    let model = into_typed(parsed.model, &flattens, errors)?;
    Ok(TypedGraph {
        graph: graph_index,
        model,
        sources,
        weights,
        bns,
        bn_facts,
        shared: HashSet::new(),
        parse,
        typing: started.elapsed().saturating_sub(parse),
    })
}

/// The errors of one graph's typing, naming the graph.
#[derive(Clone, Copy)]
struct Errors(usize);

impl Errors {
    fn unsupported(self, reason: String) -> Error {
        Error::Unsupported {
            graph: self.0,
            reason,
        }
    }

    fn problem(self, problem: GraphProblem) -> Error {
        Error::Graph {
            graph: self.0,
            problem: Box::new(problem),
        }
    }

    /// A Flatten axis outside its input's rank (rule G6).
    fn flatten_axis(self, node: &str, axis: i64, reason: String) -> Error {
        self.problem(GraphProblem::BadAttribute {
            node: node.to_string(),
            op: "Flatten".into(),
            attribute: "axis".into(),
            value: axis.to_string(),
            reason,
        })
    }
}

/// Weights by tensor index: type, shape and whether some task changes it.
pub(super) type WeightFacts = BTreeMap<usize, (DatumType, Vec<usize>, bool)>;

/// Type, shape and kind of every weight the graph uses, and each one's index by name.
fn weight_facts(
    decls: &[WeightDecl],
    errors: Errors,
) -> Result<(HashMap<&str, usize>, WeightFacts), Error> {
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    let mut weights = WeightFacts::new();
    for decl in decls {
        let dt = datum_type(decl.dtype).ok_or_else(|| {
            errors.problem(GraphProblem::WeightType {
                tensor: decl.name.clone(),
                dtype: decl.dtype,
            })
        })?;
        let shape = to_usize_shape(&decl.shape)
            .filter(|s| byte_len(dt, s).is_some())
            .ok_or_else(|| errors.unsupported(format!("weight {:?} is too large", decl.name)))?;
        by_name.insert(decl.name.as_str(), decl.index);
        weights.insert(decl.index, (dt, shape, decl.dynamic));
    }
    Ok((by_name, weights))
}

/// Puts every constant weight the graph still reads (after the BatchNorm rewrite, a
/// BatchNorm's parameters may be read by it only) into the graph as an initializer: the same
/// for every task, so part of the template. Returns `(tensor index, name)` of the dynamic
/// weights it reads, which stay model inputs.
fn add_constants(
    graph: &mut GraphProto,
    decls: &[WeightDecl],
    weights: &WeightFacts,
    constant: &mut dyn FnMut(usize) -> Result<Vec<f32>, Error>,
    errors: Errors,
) -> Result<Vec<(usize, String)>, Error> {
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
        let values = constant(decl.index)?;
        let mut raw = Vec::new();
        decl.dtype.encode(&values, &mut raw);
        let dims = shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| errors.unsupported(format!("weight {:?} is too large", decl.name)))?;
        graph.initializer.push(TensorProto {
            dims,
            data_type: crate::onnx::onnx_data_type(decl.dtype),
            name: decl.name.clone(),
            raw_data: raw,
            ..Default::default()
        });
    }
    Ok(sources)
}

/// The graph parsed by tract (with the checked operators of [`onnx_parser`]), with the
/// symbols of `symbol_values` fixed.
fn parse(
    proto: &ModelProto,
    symbol_values: &[(String, usize)],
    errors: Errors,
) -> Result<ParseResult, Error> {
    let graph_index = errors.0;
    let onnx = onnx_parser();
    let mut parsed = catch_panic(graph_index, "parsing the graph", || {
        onnx.parse(proto, None)
            .map_err(tract_err(format!("parse graph {graph_index}")))
    })?;
    if !symbol_values.is_empty() {
        let mut subs = HashMap::new();
        for (name, value) in symbol_values {
            let value = i64::try_from(*value)
                .map_err(|_| errors.unsupported(format!("symbol {name} = {value} is too large")))?;
            if let Some(symbol) = parsed.model.symbols.get(name) {
                subs.insert(symbol, TDim::Val(value));
            }
        }
        parsed
            .model
            .set_symbols(&subs)
            .map_err(tract_err(format!("fix the symbols of graph {graph_index}")))?;
    }
    Ok(parsed)
}

/// The model input tract created for `name`.
fn outlet(parsed: &ParseResult, name: &str, errors: Errors) -> Result<OutletId, Error> {
    parsed
        .outlets_by_name
        .get(name)
        .copied()
        .ok_or_else(|| errors.unsupported(format!("tract did not create an input for {name:?}")))
}

/// Refuses a graph that reads a name that is neither a graph input nor a weight, and declares
/// the type and shape of each dynamic weight's model input.
fn declare_sources(
    parsed: &mut ParseResult,
    sources: &[(usize, String)],
    weights: &WeightFacts,
    bns: &[BnRewrite],
    errors: Errors,
) -> Result<(), Error> {
    let bn_names: HashSet<&str> = bns
        .iter()
        .flat_map(|b| [b.slope.as_str(), b.intercept.as_str()])
        .collect();
    if let Some(name) = parsed
        .unresolved_inputs
        .iter()
        .find(|n| !bn_names.contains(n.as_str()) && !sources.iter().any(|(_, s)| s == *n))
    {
        return Err(errors.unsupported(format!(
            "the graph reads {name:?}, which is neither a graph input nor a weight of the bundle"
        )));
    }
    for (i, name) in sources {
        let Some((dt, shape, _)) = weights.get(i) else {
            continue;
        };
        let input = outlet(parsed, name, errors)?;
        parsed
            .model
            .set_outlet_fact(input, InferenceFact::dt_shape(*dt, shape.clone()))
            .map_err(tract_err(format!("declare weight {name:?}")))?;
    }
    Ok(())
}

/// Shape analysis: the rank and type of each BatchNorm input, and of each Flatten input. A
/// Flatten axis past the rank makes tract panic (it slices the shape), so the axes are checked
/// against the ranks whatever the outcome, before reporting a failure.
fn analyse(
    parsed: &mut ParseResult,
    flattens: &[(String, String, i64)],
    errors: Errors,
) -> Result<(), Error> {
    let graph_index = errors.0;
    let model = &mut parsed.model;
    let analysed = catch_panic(graph_index, "analysing the graph", || {
        model
            .analyse(false)
            .map_err(tract_err(format!("analyse graph {graph_index}")))
    });
    for (node, input, axis) in flattens {
        let rank = parsed
            .outlets_by_name
            .get(input)
            .and_then(|o| parsed.model.outlet_fact(*o).ok())
            .and_then(|f| f.shape.rank().concretize());
        // tract leaves the facts of a failed analysis partial: the checked Flatten's own error
        // names the axis then.
        let failed_here = matches!(&analysed, Err(Error::Tract { message, .. })
            if message.contains(&format!("Flatten axis {axis} is outside")));
        if rank.is_none() && failed_here {
            return Err(errors.flatten_axis(node, *axis, "outside the rank of its input".into()));
        }
        if let Some(rank) = rank {
            if *axis < -rank || *axis > rank {
                let reason = format!("outside [-{rank}, {rank}] for an input of rank {rank}");
                return Err(errors.flatten_axis(node, *axis, reason));
            }
        }
    }
    analysed.map(drop)
}

/// Declares the slope and intercept inputs of each rewritten BatchNorm: `[1, C, 1, …]` at the
/// rank and float type of its input, `C` the length of its four parameters. Returns, per
/// BatchNorm, that type and shape and `C`.
fn declare_batchnorm_inputs(
    parsed: &mut ParseResult,
    bns: &[BnRewrite],
    weights: &WeightFacts,
    errors: Errors,
) -> Result<Vec<(DatumType, Vec<usize>, usize)>, Error> {
    let mut bn_facts = Vec::new();
    for bn in bns {
        let fact = parsed
            .model
            .outlet_fact(outlet(parsed, &bn.x, errors)?)
            .map_err(tract_err("read a BatchNormalization input"))?;
        let rank = fact
            .shape
            .rank()
            .concretize()
            .and_then(|r| usize::try_from(r).ok())
            .filter(|&r| r >= 2);
        let dt = fact.datum_type.concretize();
        let (Some(rank), Some(dt @ (DatumType::F32 | DatumType::F16))) = (rank, dt) else {
            return Err(errors.unsupported(format!(
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
                return Err(errors.unsupported(format!(
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
            let input = outlet(parsed, name, errors)?;
            parsed
                .model
                .set_outlet_fact(input, InferenceFact::dt_shape(dt, shape.clone()))
                .map_err(tract_err(format!("declare {name:?}")))?;
        }
        bn_facts.push((dt, shape, channels));
    }
    Ok(bn_facts)
}

/// The analysed model, typed; a Flatten whose axis fails the typing is named (rule G6).
fn into_typed(
    model: InferenceModel,
    flattens: &[(String, String, i64)],
    errors: Errors,
) -> Result<TypedModel, Error> {
    let graph_index = errors.0;
    let model = catch_panic(graph_index, "typing the graph", || {
        model
            .into_typed()
            .map_err(tract_err(format!("type graph {graph_index}")))
    });
    if let Err(Error::Tract { message, .. }) = &model {
        let bad = flattens
            .iter()
            .find(|(_, _, axis)| message.contains(&format!("Flatten axis {axis} is outside")));
        if let Some((node, _, axis)) = bad {
            return Err(errors.flatten_axis(node, *axis, "outside the rank of its input".into()));
        }
    }
    model
}
