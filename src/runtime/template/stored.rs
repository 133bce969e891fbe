//! The stored graph of a template: decoded from its bundle section, and the names and weights
//! it reads.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, ModelProto};

use crate::runtime::check::GraphProblem;
use crate::runtime::{Bundle, Error};

/// Names of every value the nodes of `graph` read, and, recursively, everything their subgraphs
/// read (node inputs and outputs: a subgraph's output may be a value of the outer scope).
pub(super) fn used_names(graph: &GraphProto, out: &mut HashSet<String>) {
    for node in &graph.node {
        out.extend(node.input.iter().filter(|n| !n.is_empty()).cloned());
        for sub in node
            .attribute
            .iter()
            .flat_map(|a| a.g.iter().chain(&a.graphs))
        {
            out.extend(sub.output.iter().map(|o| o.name.clone()));
            used_names(sub, out);
        }
    }
}

/// Names `graph` reads: the inputs of its nodes, its outputs (an output may be a weight or a
/// graph input as it is) and what its subgraphs read ([`used_names`]). The compiler keeps the
/// weights this names (rule G3) and a template declares them: one definition for both.
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
#[cfg(all(test, feature = "compiler"))]
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
