//! The merge vocabulary a bundle records: which method made it, with which parameters, and how
//! each task's reconstruction is scaled.
//!
//! These are format types, not merge code: the manifest stores them (docs/FORMAT.md §4) and the
//! reader checks them, so they live here, where a runtime-only build (no `compiler` feature)
//! has them. The compiler's [`merge`](crate::merge) module builds its mergers from
//! [`MergeParams`] (`MergeParams::merger`, feature `compiler`); the formulas are in
//! docs/METHODS.md.

use serde::{Deserialize, Serialize};

/// Default TALL / Consensus mask threshold `λ` when no calibration data picks one per task
/// (docs/METHODS.md): a weight is in task `t`'s mask when `|τ_t| > λ · |τ_MTL − τ_t|`.
pub const DEFAULT_LAMBDA: f32 = 0.4;

/// The available merge methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// `δ = α Σ_t τ_t`.
    TaskArithmetic,
    /// Trim, elect sign, disjoint merge (Yadav et al., 2023).
    Ties,
    /// Random drop and rescale, then task arithmetic or TIES (Yu et al., 2024).
    Dare,
    /// Drop outliers and small entries, then task arithmetic (Davari & Belilovsky, 2024).
    Breadcrumbs,
    /// Per-task masks over the summed task vector (Wang et al., ICML 2024).
    Tall,
    /// One merged model keeping weights that at least k TALL masks select (same paper).
    Consensus,
    /// Elect, mask, rescale (Huang et al., NeurIPS 2024).
    Emr,
    /// No shared delta: every task stores its own task vector, quantized (task vector
    /// quantization, Kim et al., ICCV 2025). Format version 4.
    Tvq,
}

impl Method {
    /// All methods, in the order reports list them.
    pub const ALL: [Method; 8] = [
        Method::TaskArithmetic,
        Method::Ties,
        Method::Dare,
        Method::Breadcrumbs,
        Method::Tall,
        Method::Consensus,
        Method::Emr,
        Method::Tvq,
    ];

    /// Command-line name.
    pub const fn name(self) -> &'static str {
        match self {
            Method::TaskArithmetic => "task-arithmetic",
            Method::Ties => "ties",
            Method::Dare => "dare",
            Method::Breadcrumbs => "breadcrumbs",
            Method::Tall => "tall",
            Method::Consensus => "consensus",
            Method::Emr => "emr",
            Method::Tvq => "tvq",
        }
    }

    /// Whether the method gives each task its own mask (and hence its own reconstruction).
    /// `Tvq` gives each task its own task vector instead, as a residual.
    pub const fn is_per_task(self) -> bool {
        matches!(self, Method::Tall | Method::Emr)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown method {s:?}"))
    }
}

/// How TIES combines the kept entries that agree with the elected sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TiesReduce {
    /// Mean of the agreeing kept entries (the paper's disjoint mean).
    Mean,
    /// Sum of the agreeing kept entries.
    Sum,
}

/// Which merge DARE applies after dropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DareBase {
    /// Task arithmetic on the rescaled task vectors.
    TaskArithmetic,
    /// TIES on the rescaled task vectors.
    Ties,
}

/// Every hyper-parameter of every method, with defaults filled in. Recorded in the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeParams {
    /// The method.
    pub method: Method,
    /// Scale of the merged vector.
    pub alpha: f32,
    /// TALL / Consensus mask threshold, per task (one value per task, in task order).
    #[serde(deserialize_with = "crate::format::budget::seq")]
    pub lambda: Vec<f32>,
    /// Kept fraction for TIES, DARE and Breadcrumbs.
    pub density: f32,
    /// Breadcrumbs: fraction of largest-magnitude entries dropped as outliers.
    pub gamma: f32,
    /// Consensus: minimum number of task masks that must select a weight.
    pub min_tasks: u32,
    /// DARE: RNG seed.
    pub seed: u64,
    /// TIES: mean or sum of the agreeing entries.
    pub ties_reduce: TiesReduce,
    /// DARE: the merge applied after dropping.
    pub dare_base: DareBase,
}

impl MergeParams {
    /// The documented defaults of `method` for `n_tasks` tasks.
    pub fn defaults(method: Method, n_tasks: usize) -> MergeParams {
        let (alpha, density) = match method {
            Method::TaskArithmetic => (0.3, 1.0),
            Method::Ties => (1.0, 0.2),
            Method::Dare => (0.3, 0.5),
            Method::Breadcrumbs => (0.3, 0.9),
            Method::Tall => (1.0, 1.0),
            Method::Consensus => (0.3, 1.0),
            Method::Emr => (1.0, 1.0),
            Method::Tvq => (1.0, 1.0),
        };
        MergeParams {
            method,
            alpha,
            lambda: vec![DEFAULT_LAMBDA; n_tasks],
            density,
            gamma: 0.01,
            min_tasks: 2,
            seed: 0,
            ties_reduce: TiesReduce::Mean,
            dare_base: DareBase::TaskArithmetic,
        }
    }
}

/// Granularity of the scaling vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ScaleMode {
    /// No scaling (`s = 1`).
    #[default]
    None,
    /// One scale per tensor.
    Tensor,
    /// One scale per row (first axis).
    Row,
}

impl std::fmt::Display for ScaleMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScaleMode::None => "none",
            ScaleMode::Tensor => "tensor",
            ScaleMode::Row => "row",
        })
    }
}

impl std::str::FromStr for ScaleMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ScaleMode::None),
            "tensor" => Ok(ScaleMode::Tensor),
            "row" => Ok(ScaleMode::Row),
            other => Err(format!(
                "unknown scale mode {other:?} (expected none, tensor or row)"
            )),
        }
    }
}
