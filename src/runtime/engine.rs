//! The engine: run any task of a bundle, switching tasks in milliseconds without reloading.
//!
//! How a switch works (measured in docs/PERFORMANCE.md):
//! 1. **Once per distinct graph** (lazily, on the first use of any of its tasks): a *template* —
//!    the stored ONNX graph parsed, typed, decluttered and optimized by tract, with every weight
//!    some task changes left as a model input and every weight no task changes as a constant
//!    (see `src/runtime/template/` for the details, including `BatchNormalization`).
//! 2. **Once per task switch** (a cache miss): *binding* — the task's weights are reconstructed
//!    one at a time ([`reconstruct::task_tensor_into`](super::reconstruct::task_tensor_into),
//!    bit for bit the normative rule) into reused tensors, what the optimizer wired on the weight
//!    side is evaluated on them (the matmul packing right after each weight, folded BatchNorm
//!    products by tract's constant propagation), and the results replace the template's weight
//!    inputs as constants. No parsing, no declutter, no optimizer pass. The result is a plan as
//!    fast as a normally optimized model of the task. The weights a plan keeps unfolded (an
//!    embedding table, biases) go back to the binding pools once the plan is evicted and no
//!    longer run, so a switch writes into memory that is already mapped instead of
//!    page-faulting a fresh allocation (a third of a MiniLM switch).
//! 3. **Bound plans are cached** ([`EngineOptions::cache_bytes`], least recently used first out),
//!    so switching back to a recent task is a map lookup.
//!
//! A task whose weights exceed the whole cache budget still runs: it is bound for the call and
//! dropped afterwards (pin it with [`Engine::bind`] if that matters).
//!
//! Symbolic input dimensions (e.g. a batch `N`) stay symbolic by default, so one bound plan
//! serves every size; [`EngineOptions::symbol_values`] fixes them instead, letting tract optimize
//! for that exact shape.
//!
//! Inputs are checked before tract sees them: types and shapes against the graph, the values of
//! inputs that index a lookup table (token ids) against its size, and their total bytes against
//! [`EngineOptions::max_input_bytes`]. A panic inside tract is caught and returned as
//! [`Error::EnginePanic`] (see `src/runtime/guard.rs`): a hostile graph or input never unwinds
//! into the caller.
//!
//! An [`Engine`] is `Send + Sync`: bound plans are immutable and shared; every
//! [`Engine::run`] evaluates them with its own state, so concurrent runs of the same or of
//! different tasks give the same results as sequential ones. Threads missing the same task at
//! once bind it once (the others wait for it); different tasks bind in parallel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tract_onnx::prelude::{DatumType, TValue, TVec, TypedFact, TypedModel};
use tract_onnx::tract_hir::internal::DimLike;

use crate::runtime::cache::Lru;
use crate::runtime::check;
use crate::runtime::guard::{catch_panic, check_input_bytes};
use crate::runtime::template::{
    HeldTensors, Plan, SharedWeights, Template, TemplateKey, TypedGraph,
};
use crate::runtime::{Bundle, Error};

/// Tuning knobs of an [`Engine`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineOptions {
    /// Byte budget of the cache of bound tasks (least recently used first out), counted in the
    /// materialized weight bytes of each bound task ([`Engine::task_weight_bytes`]). A task
    /// larger than the budget still runs: it is bound for the call and dropped afterwards, so
    /// every call pays a switch. `0` disables caching. Default: 256 MiB.
    pub cache_bytes: usize,
    /// Concrete values for symbolic input dimensions, by name (the ONNX `dim_param`, e.g.
    /// `("N", 1)` for the batch of the demo models). Default: none, every symbolic dimension stays
    /// symbolic and one bound plan serves every size. Fixing a dimension lets tract's optimizer
    /// pick kernels for that exact shape (docs/PERFORMANCE.md measures the gain on the demo with
    /// `taskpack bench`); inputs must then have that size. Names a graph does not use are
    /// ignored.
    pub symbol_values: Vec<(String, usize)>,
    /// Most bytes the inputs of one [`Engine::run`] may hold (the elements of all of them);
    /// more is [`Error::InputTooLarge`], before anything runs. A run's working memory grows
    /// with its inputs (the batch), so this bounds what a caller passing through untrusted
    /// batches lets the engine allocate; raise it for larger batches. Default:
    /// [`EngineOptions::DEFAULT_MAX_INPUT_BYTES`].
    pub max_input_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_bytes: 256 << 20,
            symbol_values: Vec::new(),
            max_input_bytes: Self::DEFAULT_MAX_INPUT_BYTES,
        }
    }
}

impl EngineOptions {
    /// Default of [`EngineOptions::max_input_bytes`]: 256 MiB.
    pub const DEFAULT_MAX_INPUT_BYTES: usize = 256 << 20;

    /// These options with [`EngineOptions::max_input_bytes`] set to `bytes`.
    pub fn with_max_input_bytes(mut self, bytes: usize) -> Self {
        self.max_input_bytes = bytes;
        self
    }

    /// Default options with the given cache budget in bytes.
    pub fn with_cache_bytes(cache_bytes: usize) -> Self {
        EngineOptions {
            cache_bytes,
            ..EngineOptions::default()
        }
    }

    /// These options with symbolic dimension `name` fixed to `value` (see
    /// [`EngineOptions::symbol_values`]).
    pub fn with_symbol(mut self, name: impl Into<String>, value: usize) -> Self {
        self.symbol_values.push((name.into(), value));
        self
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

impl IoInfo {
    /// The info of a tract fact; dimensions that are not a known integer are `None`.
    pub(crate) fn from_fact(name: String, fact: &TypedFact) -> IoInfo {
        IoInfo {
            name,
            dtype: fact.datum_type,
            shape: fact.shape.iter().map(|d| d.to_usize().ok()).collect(),
        }
    }
}

/// Counters of the work an engine did since it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Templates built (parse + optimize): at most one per distinct graph.
    pub templates_built: usize,
    /// Tasks bound (materialize + bind): one per cache miss, and one per [`Engine::bind`].
    pub binds: usize,
    /// Runs or prepares that found their task already bound in the cache.
    pub cache_hits: usize,
}

/// A task bound to its weights, outside the engine's cache: runs without any lookup, and stays
/// alive as long as it is held (e.g. to pin a task whatever the cache budget).
#[derive(Clone)]
pub struct BoundTask {
    task: usize,
    name: String,
    template: Arc<Template>,
    plan: Plan,
    max_input_bytes: usize,
    materialize: Duration,
    bind: Duration,
}

impl std::fmt::Debug for BoundTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundTask")
            .field("task", &self.task)
            .field("name", &self.name)
            .field("weight_bytes", &self.weight_bytes())
            .finish_non_exhaustive()
    }
}

impl BoundTask {
    /// Index of the task.
    pub fn task(&self) -> usize {
        self.task
    }

    /// Bytes of the weights materialized for it.
    pub fn weight_bytes(&self) -> usize {
        self.template.weight_bytes()
    }

    /// Time spent reconstructing the weights, and then binding them (constant propagation and
    /// plan building).
    pub fn timings(&self) -> (Duration, Duration) {
        (self.materialize, self.bind)
    }

    /// The bound tract model, for inspection (e.g. to compare it with a normally optimized one).
    pub fn model(&self) -> &TypedModel {
        self.plan.model()
    }

    /// Runs the task, exactly as [`Engine::run`] does.
    pub fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>, Error> {
        self.template.check_inputs(&self.name, &inputs)?;
        check_input_bytes(&self.name, &inputs, self.max_input_bytes)?;
        run_plan(&self.plan, &self.name, inputs)
    }
}

/// A template, built on first use.
struct LazyTemplate {
    key: TemplateKey,
    /// A task using it (provides the shapes of private tensors).
    task: usize,
    /// Tensor indices the graph uses.
    used: Vec<usize>,
    /// The graph parsed and typed by `Engine::new`'s check, until the template is built from it.
    typed: Mutex<Option<TypedGraph>>,
    built: OnceLock<Arc<Template>>,
    building: Mutex<()>,
}

/// Runs the tasks of one bundle. `Send + Sync`: share it (e.g. in an `Arc`) between threads.
pub struct Engine {
    bundle: Arc<Bundle>,
    options: EngineOptions,
    /// Per task, its lazy template.
    task_slot: Vec<usize>,
    slots: Vec<LazyTemplate>,
    cache: Mutex<Lru<Plan>>,
    /// Per task: held while binding it for the cache, so that threads missing the same task at
    /// once bind it once.
    binding: Vec<Mutex<()>>,
    /// The weights every task reconstructs alike (`compile --shared`), once for all templates.
    shared: SharedWeights,
    /// Binding tensors that bound plans hold, taken back by later bindings once the plans are
    /// gone.
    held: HeldTensors,
    templates_built: AtomicUsize,
    binds: AtomicUsize,
    cache_hits: AtomicUsize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("bundle", &self.bundle)
            .field("options", &self.options)
            .field("templates", &self.slots.len())
            .field("cached_bytes", &self.cached_bytes())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here leaves shared state half-updated across a panic; keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a bound plan. A panic inside tract comes back as [`Error::EnginePanic`]: the plan is
/// shared and immutable, the run's state is the call's own and dropped with it.
fn run_plan(plan: &Plan, task: &str, inputs: TVec<TValue>) -> Result<TVec<TValue>, Error> {
    let action = || format!("run task {task}");
    catch_panic(action, || {
        plan.run(inputs).map_err(|e| Error::Tract {
            action: action(),
            message: format!("{e:#}"),
        })
    })
}

/// Binds `task` into `template`. A panic inside tract comes back as [`Error::EnginePanic`]:
/// nothing is cached before binding returns, and the binding buffers it was using are dropped
/// with the unwinding, not returned to the template's pool.
fn bind_template(
    template: &Template,
    bundle: &Bundle,
    (task, name): (usize, &str),
    shared: (&SharedWeights, &HeldTensors),
) -> Result<(Plan, crate::runtime::template::BindTimings), Error> {
    catch_panic(
        || format!("bind task {name}"),
        || template.bind(bundle, task, name, shared),
    )
}

impl Engine {
    /// Builds an engine over `bundle`, after checking that every graph can run with its tasks'
    /// tensors (the graph rules G1–G7 of docs/FORMAT.md, [`Error::Graph`] naming the node,
    /// attribute or tensor at fault): each stored graph is decoded and checked, then parsed and
    /// typed by tract once per template, with every task's weights declared at their type and
    /// shape. Reads the (small) stored graphs, whose checksums it verifies, and the weights no
    /// task changes (constants of the templates). The typed models are kept: a template is
    /// completed (decluttered and optimized) from its typed model on the first use of its graph
    /// (or by [`Engine::prepare`]), so nothing is parsed twice.
    pub fn new(bundle: Arc<Bundle>, options: EngineOptions) -> Result<Engine, Error> {
        let map = check::template_map(&bundle)?;
        let mut slots = Vec::with_capacity(map.slots.len());
        for (key, task, used) in map.slots {
            let typed = Template::type_graph(&bundle, &key, task, &used, &options.symbol_values)?;
            slots.push(LazyTemplate {
                key,
                task,
                used,
                typed: Mutex::new(Some(typed)),
                built: OnceLock::new(),
                building: Mutex::new(()),
            });
        }
        let task_slot = map.task_slot;
        let manifest = bundle.manifest();
        log::debug!(
            "engine: {} tasks, {} graphs, {} templates",
            manifest.tasks.len(),
            manifest.graphs.len(),
            slots.len()
        );
        Ok(Engine {
            binding: (0..task_slot.len()).map(|_| Mutex::new(())).collect(),
            task_slot,
            slots,
            cache: Mutex::new(Lru::new(options.cache_bytes)),
            options,
            bundle,
            shared: SharedWeights::default(),
            held: HeldTensors::default(),
            templates_built: AtomicUsize::new(0),
            binds: AtomicUsize::new(0),
            cache_hits: AtomicUsize::new(0),
        })
    }

    /// The bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The options the engine was built with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
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

    /// The data inputs of task `task`'s graph (not the weights), in the order [`Engine::run`]
    /// takes them. Builds the graph's template if needed.
    pub fn input_facts(&self, task: usize) -> Result<Vec<IoInfo>, Error> {
        Ok(self.template(task)?.inputs().to_vec())
    }

    /// The outputs of task `task`'s graph, in the order [`Engine::run`] returns them.
    pub fn output_facts(&self, task: usize) -> Result<Vec<IoInfo>, Error> {
        Ok(self.template(task)?.outputs().to_vec())
    }

    /// Bytes of weights task `task` materializes when bound (what it costs in the cache).
    pub fn task_weight_bytes(&self, task: usize) -> Result<usize, Error> {
        Ok(self.template(task)?.weight_bytes())
    }

    /// Binds task `task` and caches it, so that the next [`Engine::run`] of it is a cache
    /// lookup. A task larger than the cache budget is bound and dropped (only its graph's template
    /// stays warm).
    pub fn prepare(&self, task: usize) -> Result<(), Error> {
        self.plan(task).map(drop)
    }

    /// Runs task `task` on `inputs` (one per data input, in [`Engine::input_facts`] order).
    /// Symbolic dimensions (e.g. the batch size) take the size of the given inputs.
    ///
    /// Refused before running: inputs of the wrong number, type or shape
    /// ([`Error::InputCount`], [`Error::InputMismatch`]), an index outside the table a lookup
    /// of the graph reads, e.g. a token id outside the vocabulary ([`Error::IndexOutOfRange`]),
    /// more than [`EngineOptions::max_input_bytes`] ([`Error::InputTooLarge`]). A panic inside
    /// tract is [`Error::EnginePanic`].
    pub fn run(&self, task: usize, inputs: TVec<TValue>) -> Result<TVec<TValue>, Error> {
        let template = self.template(task)?;
        let name = self.name(task)?;
        template.check_inputs(name, &inputs)?;
        check_input_bytes(name, &inputs, self.options.max_input_bytes)?;
        let plan = self.plan(task)?;
        run_plan(&plan, name, inputs)
    }

    /// Binds task `task` now, bypassing the cache (neither reading nor filling it): a cold
    /// switch. Useful to pin a task, and to measure switching.
    pub fn bind(&self, task: usize) -> Result<BoundTask, Error> {
        let template = self.template(task)?;
        let name = self.name(task)?;
        let (plan, timings) = self.bind_now(&template, task, name)?;
        Ok(BoundTask {
            task,
            name: name.to_string(),
            template,
            plan,
            max_input_bytes: self.options.max_input_bytes,
            materialize: timings.materialize,
            bind: timings.bind,
        })
    }

    /// Materialized weight bytes of the tasks currently cached (at most
    /// [`EngineOptions::cache_bytes`]).
    pub fn cached_bytes(&self) -> usize {
        lock(&self.cache).bytes()
    }

    /// Whether task `task` is bound in the cache.
    pub fn is_cached(&self, task: usize) -> bool {
        lock(&self.cache).contains(task)
    }

    /// Drops every cached bound task and the binding buffers each template keeps for reuse, per
    /// binding that ran concurrently: one tensor per distinct weight shape when every weight is
    /// packed as it is reconstructed (transformers), up to [`Engine::task_weight_bytes`] when
    /// constant propagation needs all of them at once (e.g. BatchNorm folded into convolutions),
    /// and the weights evicted tasks used unfolded (e.g. an embedding table), which the next
    /// binding would otherwise reconstruct into rather than allocate anew.
    /// Templates stay, and so do the weights every task shares (`compile --shared`), which are
    /// reconstructed once per engine and not counted in `cache_bytes`.
    pub fn clear_cache(&self) {
        lock(&self.cache).clear();
        for template in self.slots.iter().filter_map(|s| s.built.get()) {
            template.release_buffers();
        }
        self.held.clear();
    }

    /// Work counters since the engine was created.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            templates_built: self.templates_built.load(Ordering::Relaxed),
            binds: self.binds.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
        }
    }

    fn name(&self, task: usize) -> Result<&str, Error> {
        self.task_name(task).ok_or(Error::OutOfRange {
            what: "task",
            index: task,
            count: self.task_count(),
        })
    }

    /// The template of task `task`, built on first use (once, whatever the number of threads).
    fn template(&self, task: usize) -> Result<Arc<Template>, Error> {
        let out_of_range = || Error::OutOfRange {
            what: "task",
            index: task,
            count: self.task_count(),
        };
        let slot = self
            .task_slot
            .get(task)
            .and_then(|&s| self.slots.get(s))
            .ok_or_else(out_of_range)?;
        if let Some(t) = slot.built.get() {
            return Ok(Arc::clone(t));
        }
        let _building = lock(&slot.building);
        if let Some(t) = slot.built.get() {
            return Ok(Arc::clone(t));
        }
        // A panic while building leaves the slot empty (and its lock unpoisoned: the panic
        // stops inside): the next call types the graph again and fails the same way.
        let template = catch_panic(
            || format!("build the template of graph {}", slot.key.graph),
            || {
                let typed = match lock(&slot.typed).take() {
                    Some(typed) => typed,
                    None => Template::type_graph(
                        &self.bundle,
                        &slot.key,
                        slot.task,
                        &slot.used,
                        &self.options.symbol_values,
                    )?,
                };
                Template::from_typed(typed)
            },
        )?;
        let template = Arc::new(template);
        self.templates_built.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::clone(slot.built.get_or_init(|| template)))
    }

    /// Binds `task` into `template` with the engine's shared weights and reused tensors, and
    /// counts the binding.
    fn bind_now(
        &self,
        template: &Template,
        task: usize,
        name: &str,
    ) -> Result<(Plan, crate::runtime::template::BindTimings), Error> {
        let bound = bind_template(
            template,
            &self.bundle,
            (task, name),
            (&self.shared, &self.held),
        )?;
        self.binds.fetch_add(1, Ordering::Relaxed);
        Ok(bound)
    }

    /// The bound plan of task `task`: from the cache, or bound now (and cached if it fits).
    fn plan(&self, task: usize) -> Result<Plan, Error> {
        if let Some(plan) = lock(&self.cache).get(task) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(plan);
        }
        let template = self.template(task)?;
        let name = self.name(task)?;
        let bytes = template.weight_bytes();
        let cacheable = bytes <= self.options.cache_bytes;
        let _binding = match (cacheable, self.binding.get(task)) {
            (true, Some(m)) => {
                let guard = lock(m);
                // Another thread may have bound it while this one waited.
                if let Some(plan) = lock(&self.cache).get(task) {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(plan);
                }
                Some(guard)
            }
            _ => None,
        };
        if cacheable {
            // Free the plans that will be evicted anyway before binding, not after: otherwise
            // they and the new task's weights are all resident at the peak.
            lock(&self.cache).make_room(bytes);
        }
        let (plan, timings) = self.bind_now(&template, task, name)?;
        log::debug!(
            "bound task {name} ({bytes} weight bytes): materialize {:?}, bind {:?}",
            timings.materialize,
            timings.bind
        );
        if cacheable {
            lock(&self.cache).insert(task, Arc::clone(&plan), bytes);
        } else {
            log::debug!(
                "task {name} ({bytes} bytes) exceeds the cache budget ({} bytes): not cached",
                self.options.cache_bytes
            );
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a cache of one task, binding a second evicts the first before binding (so that the
    /// two are not resident together), and that very binding takes back the tensors the
    /// evicted plan held: nothing waits between switches but the live plan's own.
    #[test]
    #[cfg(feature = "compiler")]
    fn a_switch_takes_back_what_the_task_it_evicts_held() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/text");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("text.tpk");
        let tasks = ["mood", "topic"]
            .map(|t| (t.to_string(), models.join(format!("{t}.onnx"))))
            .to_vec();
        let opts = crate::compile::CompileOptions::new(
            models.join("base.onnx"),
            tasks,
            crate::format::Method::Tvq,
            &out,
        );
        drop(crate::compile::compile(&opts, &mut |_| {}).unwrap());
        let bundle = Arc::new(Bundle::read(&out).unwrap());
        let probe = Engine::new(Arc::clone(&bundle), EngineOptions::default()).unwrap();
        let [a, b] = [0, 1].map(|t| probe.task_weight_bytes(t).unwrap());
        let engine = Engine::new(bundle, EngineOptions::with_cache_bytes(a.max(b))).unwrap();
        engine.prepare(0).unwrap();
        assert_eq!(engine.held.waiting(), (0, 1), "(gone, alive)");
        engine.prepare(1).unwrap();
        assert!(!engine.is_cached(0) && engine.is_cached(1));
        assert_eq!(engine.held.waiting(), (0, 1));
        // A task bound outside the cache leaves its tensors waiting once dropped.
        drop(engine.bind(0).unwrap());
        assert_eq!(engine.held.waiting(), (1, 1));
        engine.clear_cache();
        assert_eq!(engine.held.waiting(), (0, 0));
    }

    #[test]
    fn engine_and_bound_tasks_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Engine>();
        check::<BoundTask>();
    }
}
