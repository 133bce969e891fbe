//! `BatchNormalization` nodes with task-dependent parameters, rewritten into
//! `Add(intercept, Mul(slope, x))` before tract parses the graph, and the slope and intercept
//! binding computes from a task's four parameters (see the module docs of `template`).

use std::collections::HashSet;

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{GraphProto, NodeProto};

use super::stored::used_names;

/// A `BatchNormalization` node rewritten into `Add(intercept, Mul(slope, x))`.
#[derive(Debug)]
pub(super) struct BnRewrite {
    pub(super) x: String,
    pub(super) params: [usize; 4],
    pub(super) epsilon: f32,
    pub(super) slope: String,
    pub(super) intercept: String,
    pub(super) node: String,
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
pub(super) fn rewrite_batchnorms(
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

/// tract's lowering of an inference-mode BatchNormalization, in `f32`:
/// `slope = γ / √(var + ε)`, `intercept = β − (mean · γ) / √(var + ε)`.
pub(super) fn batchnorm_affine(
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

    #[test]
    fn batchnorm_affine_matches_the_definition() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        batchnorm_affine(&[2.0], &[1.0], &[3.0], &[3.0], 1.0, &mut a, &mut b);
        // y = 2 (x − 3) / 2 + 1 = x − 2.
        assert_eq!(a, [1.0]);
        assert_eq!(b, [-2.0]);
    }
}
