//! The engine: run any task of a bundle, switching tasks in milliseconds without reloading.
//!
//! (Skeleton: the public API is fixed; the implementation follows in the same module.)

use std::sync::Arc;

use tract_onnx::prelude::{DatumType, TValue, TVec};

use crate::runtime::{Bundle, Error};

/// Tuning knobs of an [`Engine`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineOptions {
    /// Byte budget of the cache of bound tasks (least recently used first out). Counts the
    /// materialized weight bytes of each bound task. A task larger than the budget still runs:
    /// it is bound for the call and dropped afterwards. Default: 256 MiB.
    pub cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_bytes: 256 << 20,
        }
    }
}

impl EngineOptions {
    /// Options with the given cache budget in bytes.
    pub fn with_cache_bytes(cache_bytes: usize) -> Self {
        EngineOptions { cache_bytes }
    }
}

/// Name, element type and shape of one graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoInfo {
    /// The ONNX name.
    pub name: String,
    /// Element type.
    pub dtype: DatumType,
    /// Shape; `None` for a symbolic dimension (e.g. the batch size).
    pub shape: Vec<Option<usize>>,
}

/// Runs the tasks of one bundle. `Send + Sync`: share it (e.g. in an `Arc`) between threads.
pub struct Engine {
    bundle: Arc<Bundle>,
    options: EngineOptions,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("bundle", &self.bundle)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Builds an engine over `bundle`.
    pub fn new(bundle: Arc<Bundle>, options: EngineOptions) -> Result<Engine, Error> {
        Ok(Engine { bundle, options })
    }

    /// The bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// Number of tasks.
    pub fn task_count(&self) -> usize {
        self.bundle.manifest().tasks.len()
    }

    /// Name of task `task`, `None` if out of range.
    pub fn task_name(&self, task: usize) -> Option<&str> {
        self.bundle
            .manifest()
            .tasks
            .get(task)
            .map(|t| t.name.as_str())
    }

    /// Index of the task called `name` ([`Error::UnknownTask`] lists the known names).
    pub fn task_index(&self, name: &str) -> Result<usize, Error> {
        self.bundle.task_index(name)
    }

    /// The inputs of task `task`'s graph (the data inputs, not the weights).
    pub fn input_facts(&self, task: usize) -> Result<Vec<IoInfo>, Error> {
        self.check_task(task)?;
        Err(not_yet())
    }

    /// The outputs of task `task`'s graph.
    pub fn output_facts(&self, task: usize) -> Result<Vec<IoInfo>, Error> {
        self.check_task(task)?;
        Err(not_yet())
    }

    /// Binds task `task` (materializes its weights into its graph's template) and caches it, so
    /// that the next [`Engine::run`] of it is a cache lookup.
    pub fn prepare(&self, task: usize) -> Result<(), Error> {
        self.check_task(task)?;
        Err(not_yet())
    }

    /// Runs task `task` on `inputs` (one per graph input, in graph order).
    pub fn run(&self, task: usize, inputs: TVec<TValue>) -> Result<TVec<TValue>, Error> {
        self.check_task(task)?;
        let _ = inputs;
        Err(not_yet())
    }

    /// Materialized weight bytes of the tasks currently cached (at most
    /// [`EngineOptions::cache_bytes`]).
    pub fn cached_bytes(&self) -> usize {
        0
    }

    fn check_task(&self, task: usize) -> Result<(), Error> {
        let count = self.task_count();
        if task < count {
            Ok(())
        } else {
            Err(Error::OutOfRange {
                what: "task",
                index: task,
                count,
            })
        }
    }
}

fn not_yet() -> Error {
    Error::Unsupported {
        graph: 0,
        reason: "the engine is not implemented yet".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Engine>();
    }
}
