"""The training skeleton every stage shares: mesh, sharded state, resume, one jitted step, logs.

A stage describes itself with a `Stage` (its models and optimizers, its step, its data, its
image summary, its EMA) and calls `train(config, workdir, make_stage)`:

    def train_and_evaluate(config, workdir):
        return loop.train(config, workdir, make_stage)

What `train` does, in order:
  1. `jax.distributed` start-up when the environment asks for it (`maybe_initialize`), then
     `make_stage(config)` (which may load frozen networks: VGG19, a face-ID embedder).
  2. The mesh from `config.mesh.axes`; parameter shardings from the logical-axis rules
     `config.mesh.rules`, computed on the abstract state (`abstract_state`, nothing
     allocated); the batch is split over the mesh axes of the rules' "batch" entry.
  3. Resume: the latest checkpoint in `<workdir>/checkpoints` (train state + grain iterator
     position), else a fresh state created already sharded. A resumed run continues at the
     next step with exactly the next batch.
  4. ONE functional step, `jax.jit` with in/out shardings and the state donated, lowered and
     compiled once up front (compile time and `memory_analysis()` logged):

        step(state, batch, step_index, frozen) -> (state, metrics)
          train_state = nnx.merge(graphdef, state)
          metrics = stage.train_step(train_state, batch, rng, frozen)   # updates in place
          EMA update (stage.ema)
          ok = no NaN/inf in the metrics (losses, gradient norms)
          return (new state if ok else the incoming one), metrics + {"train/skipped": !ok}

     `rng` is `fold_in(key(config.seed), step_index)`: deterministic across resumes. Frozen
     networks (`stage.frozen`, a pytree of arrays) are a separate replicated argument, never
     part of the optimised (and checkpointed) state.
  5. The loop: a global batch per step (`global_batch`); every log_every steps the metrics
     averaged over those steps, plus perf/step_seconds and perf/data_wait (the share of wall
     time spent waiting for the loader), into metrics.jsonl + TensorBoard + a progress line
     with the ETA (main process); labelled image grids every image_every steps; checkpoints
     every checkpoint_every steps (asynchronous) and at the end, each with the EMA module's
     weights as their own item (`checkpointing`: what inference restores).
     Also per interval: perf/checkpoint_seconds (blocked in saves) and perf/compile_seconds;
     at the end a goodput line (productive step time / wall time; the shares of compiling,
     data wait and checkpointing), also in <workdir>/summary.jsonl and TrainResult.goodput.
  5b. Bad steps: a step with a NaN/inf metric (loss, gradient norm) keeps the old state
     (selected on device: no host sync), is left out of the logged means and counted in
     train/skipped_steps (over the whole run). The per-step flags reach the host with the
     metrics at log steps; once train.max_bad_steps steps in a row were bad, the run logs
     one line saying so, saves (the state is the last good one) and returns with
     stopped_early and stop_reason set.
  5c. Evaluation (big_vision style): every train.eval_every steps (and at the last step) the
     evaluators of config.evals (`vasa_jax.evaluate.evaluate_during_training`) run on the
     checkpoint of that step (saved then if needed); their numbers are logged as
     eval/<name>/<key> next to the losses. Single-process runs only.
  6. Stopping early: SIGINT (Ctrl-C) or SIGTERM finishes the current step, saves a
     checkpoint and returns; a second Ctrl-C aborts at once. With several processes, a
     cluster preemption notice (orbax `reached_preemption`) does the same, and a local
     Ctrl-C is agreed on by all processes at the next log step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vasa_jax import checkpointing
from vasa_jax.parallel import distributed, sharding
from vasa_jax.parallel.mesh import create_mesh
from vasa_jax.trainers import logger as logger_lib

CHECKPOINT_DIR = checkpointing.CHECKPOINT_DIR
# XLA:CPU options that cut compile time ~3x (LLVM at -O0) at the cost of slower steps: for
# tests and smoke runs of the real models on CPU, never for training.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class EMA:
    """An exponential moving average of one module of the train state, kept by the loop.

    After every step: ema <- decay * ema + (1 - decay) * live for every nnx.Param; other
    variables (e.g. normalisation statistics) are copied from the live module.
    source / target: attribute names of the live module and its EMA copy on the train state.
    """

    source: str
    target: str
    decay: float


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a training stage plugs into `train`.

    create_state: () -> the train state, one nnx graph node holding the trained modules and
      their nnx.Optimizers (e.g. an nnx.Module with attributes generator, ema,
      discriminator, g_opt, d_opt). Deterministic: it runs twice (abstractly, then for
      real, directly sharded).
    train_step: (train_state, batch, rng, frozen) -> metrics {name: float32 scalar}. Runs
      traced inside the loop's jitted step; it updates train_state in place (optimizer
      updates) and must not add or remove variables. The metrics must include the losses
      and the gradients' global norms: a NaN/inf in any metric discards the step's update.
        batch: {key: global jax.Array [B, ...]} for `batch_keys`, B split over the mesh
          axes of the "batch" entry of config.mesh.rules.
        rng: a PRNG key, different every step.
        frozen: `frozen` below, replicated on every device.
    make_dataset: (process_index, process_count) -> grain.IterDataset of dict batches (this
      process's rows; the iterator position is checkpointed).
    batch_keys: the batch entries the step needs (others stay on the host; "num_skipped",
      if present, is counted and logged as data/skipped_records).
    frozen: a pytree of arrays (e.g. {"vgg": nnx.State}) the step reads but never updates;
      the stage's train_step merges it with graphdefs it closes over.
    image_summary: (train_state, batch, frozen) -> {row name: images [N, H, W, 3] in
      [-1, 1]}, rows of a labelled grid (N = train.image_samples; batch holds the first N
      examples of the run's first batch). None: no images.
    ema: the EMA the loop maintains, if any.
    progress_keys: metrics on the progress line (default: those named loss*).
    config: the config as the stage runs it, when make_stage resolved some of its values
      (a loss weight forced to 0, a weight computed from the data): saved with every
      checkpoint and logged in place of the given one, so the run records what ran. None:
      the given config.
    """

    create_state: Callable[[], Any]
    train_step: Callable[[Any, Batch, jax.Array, Any], Metrics]
    make_dataset: Callable[[int, int], grain.IterDataset]
    batch_keys: tuple[str, ...]
    frozen: Any = None
    image_summary: Callable[[Any, Batch, Any], Mapping[str, jax.Array]] | None = None
    ema: EMA | None = None
    progress_keys: tuple[str, ...] | None = None
    config: ml_collections.ConfigDict | None = None


def optimizer_step(module: nnx.Module, opt: nnx.Optimizer,
                   loss_fn: Callable[[nnx.Module], tuple[jax.Array, Mapping[str, jax.Array]]],
                   lr_schedule: Callable[[jax.Array], jax.Array]) -> dict[str, jax.Array]:
    """One optimizer step of a single-network stage, inside its train_step: the gradient of
    loss_fn(module) -> (loss, metrics) with respect to the module's nnx.Params (its other
    variables held fixed), opt.update in place. Returns {"loss/total", **metrics,
    "grad_norm", "lr"} (the learning rate of the step just taken)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    step = opt.step[...]
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p, rest)), has_aux=True)(params)
    opt.update(module, grads)
    return {"loss/total": loss, **metrics, "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(step)}


class TrainResult(NamedTuple):
    """What `train` returns (on every process)."""

    step: int  # steps finished (== train.total_steps unless stopped early)
    graphdef: Any  # nnx.merge(graphdef, state) gives the train state object
    state: Any  # nnx.State of sharded jax.Arrays
    metrics: dict[str, float]  # the last logged metrics ({} if no step ran)
    compile_seconds: float | None  # lowering + compiling the step (None if no step ran)
    memory: dict[str, int]  # compiled.memory_analysis() fields, bytes per device
    stopped_early: bool  # a signal, preemption or train.max_bad_steps ended it early
    skipped_steps: int = 0  # steps of the run (all calls) whose update was discarded (NaN/inf)
    stop_reason: str = ""  # why the run stopped at a bad-step streak ("" otherwise)
    # logger.goodput_summary of this call: wall seconds and the shares of productive steps,
    # compiling, data wait and checkpointing (None when no step ran).
    goodput: Mapping[str, float] | None = None
    config: ml_collections.ConfigDict | None = None  # the config as run (Stage.config)


# ------------------------------------------------------------------------------ pieces


def update_ema(ema: nnx.Module, live: nnx.Module, decay: float | jax.Array) -> None:
    """ema <- decay * ema + (1 - decay) * live for nnx.Params (in the EMA's dtype); other
    variables of `live` are copied. Both modules must have the same structure."""
    ema_params, live_params = nnx.state(ema, nnx.Param), nnx.state(live, nnx.Param)
    if jax.tree.structure(ema_params) != jax.tree.structure(live_params):
        raise ValueError("EMA and live modules have different parameter structures")

    def blend(e, p):
        mixed = decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
        return mixed.astype(e.dtype)

    nnx.update(ema, jax.tree.map(blend, ema_params, live_params))
    others = nnx.state(live, nnx.Not(nnx.Param))
    if jax.tree.leaves(others):
        nnx.update(ema, others)


def param_counts(train_state: Any) -> dict[str, int]:
    """nnx.Param scalars per attribute of the train state (attributes without any skipped)."""
    counts = {}
    for name, value in vars(train_state).items():
        if isinstance(value, nnx.Module):
            n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(value, nnx.Param)))
            if n:
                counts[name] = int(n)
    return counts


def memory_stats(compiled: Any) -> dict[str, int]:
    """The byte counts of `compiled.memory_analysis()` ({} where the backend has none)."""
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return {}
    if analysis is None:
        return {}
    return {name: int(getattr(analysis, name)) for name in dir(analysis)
            if name.endswith("_in_bytes") and isinstance(getattr(analysis, name), int)}


def config_changes(given: ml_collections.ConfigDict, ran: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (given value, value run)} for the leaves that differ."""

    def flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else
                       {prefix + k: v})
        return out

    a, b = flat(given.to_dict()), flat(ran.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _replicate(tree: Any, replicated: NamedSharding) -> Any:
    """Host or single-device arrays -> copies on every device of the mesh (multi-host safe:
    each process fills its own devices from its own copy, identical on all processes)."""

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

    return jax.tree.map(one, tree)


def _host(tree: Any) -> Any:
    """Replicated jax.Arrays -> numpy (from this process's first shard: works multi-host)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class _StopRequest:
    """Turns SIGINT (and SIGTERM when single-process) into a "save and stop" request.

    SIGTERM is left alone with several processes: jax.distributed's preemption notifier
    owns it there, and orbax's `reached_preemption` reports it to every process at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop without saving
        self.requested = True
        logging.warning("%s received: finishing this step, saving a checkpoint, stopping "
                        "(Ctrl-C again to abort without saving)", signal.Signals(signum).name)

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_agree_to_stop(local: bool) -> bool:
    """True on every process if any process asked to stop (a collective: call everywhere)."""
    if jax.process_count() == 1:
        return local
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))


# ------------------------------------------------------------------------------ the loop


def create_state(create_fn: Callable[[], Any], shardings: Any, mesh: Mesh, rules: Any,
                 compiler_options: Mapping[str, Any] | None = None) -> Any:
    """The real state `nnx.split(create_fn())[1]`, created directly with `shardings`.

    `sharding.create_sharded_state` given the shardings already computed (it would trace
    create_fn abstractly once more: slow for a big model) and XLA compiler options.
    """

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.split(create_fn())[1]

    with sharding.mesh_rules(mesh, rules):
        lowered = jax.jit(init, out_shardings=shardings).lower()
    return lowered.compile(compiler_options)()


SKIPPED = "train/skipped"  # the step's metric: 1.0 when its update was discarded, else 0.0
SKIPPED_STEPS = "train/skipped_steps"  # logged: skipped steps of the run so far


def all_finite(tree: Any) -> jax.Array:
    """bool scalar: no NaN/inf in any floating-point leaf of `tree` (True if it has none)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def make_step_fn(graphdef: Any, stage: Stage, seed: int) -> Callable:
    """The functional step (state, batch, step_index, frozen) -> (state, metrics).

    A step with a NaN/inf in any of the stage's metrics (its losses and gradient norms:
    a NaN/inf gradient makes the global norm one) returns the incoming state unchanged,
    selected on device (no host sync), and reports metrics[SKIPPED] = 1.0; the stage's
    metrics are returned as computed. Only the metrics are checked: a finiteness pass over
    the whole new state cost 3x the step time of an optimizer-bound toy step on CPU.
    """

    def step(state, batch, step_index, frozen):
        old = jax.tree.leaves(state)  # the arrays: merged Variables are updated in place
        train_state = nnx.merge(graphdef, state)
        rng = jax.random.fold_in(jax.random.key(seed), step_index)
        metrics = stage.train_step(train_state, batch, rng, frozen)
        if stage.ema is not None:
            update_ema(getattr(train_state, stage.ema.target),
                       getattr(train_state, stage.ema.source), stage.ema.decay)
        ok = all_finite(metrics)
        leaves, treedef = jax.tree.flatten(nnx.state(train_state))
        if len(leaves) != len(old):
            raise ValueError("the stage's train_step added or removed state variables")
        kept = [jnp.where(ok, n, o) for n, o in zip(leaves, old)]
        return jax.tree.unflatten(treedef, kept), {**metrics, SKIPPED: 1.0 - ok.astype(jnp.float32)}

    return step


class ImageFn:
    """(state, batch, frozen) -> tuple of row images, for the first num_samples batch rows.

    Rows come back as a tuple (a jitted dict output would come back with sorted keys);
    `row_names` holds their names, in the stage's order, once the function was traced.
    """

    def __init__(self, graphdef: Any, stage: Stage, num_samples: int):
        self.graphdef = graphdef
        self.stage = stage
        self.num_samples = num_samples
        self.row_names: tuple[str, ...] | None = None

    def __call__(self, state, batch, frozen) -> tuple[jax.Array, ...]:
        train_state = nnx.merge(self.graphdef, state)
        first = jax.tree.map(lambda x: x[:self.num_samples], batch)
        rows = self.stage.image_summary(train_state, first, frozen)
        self.row_names = tuple(rows)
        return tuple(rows.values())


def jit_step(graphdef: Any, stage: Stage, seed: int, shardings: Any,
             batch_sharding: NamedSharding, replicated: NamedSharding) -> Callable:
    """The jitted step (`make_step_fn`) with the state sharded by `shardings` (and donated),
    the batch by `batch_sharding`, the step index and frozen networks replicated: what
    `train` runs and `vasa_jax.bench.aot` compiles for a TPU topology ahead of time."""
    return jax.jit(
        make_step_fn(graphdef, stage, seed),
        in_shardings=(shardings, batch_sharding, replicated, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def train(config: ml_collections.ConfigDict, workdir: str,
          make_stage: Callable[[ml_collections.ConfigDict], Stage], *,
          compiler_options: Mapping[str, Any] | None = None) -> TrainResult:
    """Trains (or resumes) the stage `make_stage(config)` in `workdir`; see the module doc.

    Reads config.seed, config.mesh (axes, rules) and config.train (configs.common
    .train_config). Every process must call it.
    compiler_options: XLA options for compiling the init and the step, e.g.
      `FAST_CPU_COMPILE` for smoke tests (3x faster CPU compiles, slower steps).
    """
    call_start = time.perf_counter()
    distributed.maybe_initialize()
    t = config.train
    main = distributed.is_main_process()
    stage = make_stage(config)
    if main:
        os.makedirs(workdir, exist_ok=True)

    mesh = create_mesh(config.mesh.axes)
    rules = config.mesh.rules
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = sharding.data_sharding(mesh, sharding.batch_axes(rules))
    logging.info("batch split over mesh axes %s", batch_sharding.spec[0])
    run_config = config if stage.config is None else stage.config
    for field, (given, ran) in config_changes(config, run_config).items():
        logging.info("config.%s runs as %r (given %r)", field, ran, given)

    graphdef, abstract, shardings = sharding.abstract_state(stage.create_state, mesh, rules)
    counts = param_counts(nnx.merge(graphdef, abstract))
    logging.info("parameters: %s", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))

    data_iter = iter(stage.make_dataset(jax.process_index(), jax.process_count()))
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=t.keep_checkpoints,
        keep_period=t.keep_period or None, async_save=t.async_checkpoints,
    )
    start = time.perf_counter()
    state, step = checkpointer.restore_or_create(
        abstract,
        lambda: create_state(stage.create_state, shardings, mesh, rules, compiler_options),
        data_iter=data_iter,
    )
    logging.info("%s at step %d of %d (state ready in %.1f s; workdir %s)",
                 "resuming" if step else "starting", step, t.total_steps,
                 time.perf_counter() - start, workdir)
    frozen = _replicate(stage.frozen, replicated)
    writer = logger_lib.MetricWriter(workdir, enabled=main)

    def next_batch() -> tuple[dict, int]:
        local = next(data_iter)
        missing = [k for k in stage.batch_keys if k not in local]
        if missing:
            raise KeyError(f"the dataset's batches lack {missing} (have {sorted(local)})")
        skipped = int(np.sum(local["num_skipped"])) if "num_skipped" in local else 0
        batch = sharding.global_batch({k: local[k] for k in stage.batch_keys}, batch_sharding)
        return batch, skipped

    compile_seconds, memory, last_metrics, stopped, stop_reason = None, {}, {}, False, ""
    last_saved = step if checkpointer.latest_step() == step else None
    first_step = step
    # train/skipped_steps counts over the whole run: continued from the log on a resume.
    skipped_steps = int(logger_lib.last_logged(workdir, SKIPPED_STEPS, step)) if main else 0
    try:
        if step >= t.total_steps:
            logging.info("nothing to do: step %d >= train.total_steps %d", step, t.total_steps)
            return TrainResult(step, graphdef, state, {}, None, {}, False, config=run_config)

        step_fn = jit_step(graphdef, stage, config.seed, shardings, batch_sharding, replicated)
        start = time.perf_counter()
        batch, skipped = next_batch()
        first_wait = time.perf_counter() - start
        image_batch = batch  # image summaries always show the run's first examples
        step_index = np.int32(step)
        start = time.perf_counter()
        with sharding.mesh_rules(mesh, rules):
            lowered = step_fn.lower(abstract, batch, step_index, frozen)
        traced = time.perf_counter()
        compiled = lowered.compile(compiler_options)
        compile_seconds = time.perf_counter() - start
        memory = memory_stats(compiled)
        logging.info(
            "train step compiled in %.1f s (tracing %.1f s, XLA %.1f s); per device: %s",
            compile_seconds, traced - start, compile_seconds - (traced - start),
            ", ".join(f"{k.removesuffix('_in_bytes')} {_mib(v)}" for k, v in memory.items() if v),
        )
        image_fn = image_compiled = None  # compiled at the first image step
        make_images = stage.image_summary is not None and t.image_every > 0
        # Seconds of this call, for the goodput summary (disjoint parts of its wall time),
        # and of the current log interval (logged as perf/*).
        totals = {"compile": compile_seconds, "data_wait": first_wait, "checkpoint": 0.0,
                  "steps": 0.0, "skipped": 0}
        interval = {"compile": compile_seconds, "checkpoint": 0.0}

        def write_images(at_step: int) -> None:
            nonlocal image_fn, image_compiled
            start = time.perf_counter()
            if image_fn is None:
                image_fn = ImageFn(graphdef, stage, t.image_samples)
                jitted = jax.jit(image_fn, in_shardings=(shardings, batch_sharding, replicated),
                                 out_shardings=replicated)
                with sharding.mesh_rules(mesh, rules):
                    image_compiled = jitted.lower(abstract, image_batch, frozen).compile(
                        compiler_options)
                compiled_in = time.perf_counter() - start
                totals["compile"] += compiled_in
                interval["compile"] += compiled_in
            rows = dict(zip(image_fn.row_names, _host(image_compiled(state, image_batch, frozen))))
            grid = logger_lib.image_grid(rows)
            paths = writer.write_images(at_step, {"samples": grid})
            logging.info("images at step %d (%.1f s): %s", at_step, time.perf_counter() - start,
                         " ".join(paths))

        def save(at_step: int) -> None:
            nonlocal last_saved
            start = time.perf_counter()
            # The EMA module again as its own item: what inference restores (the weights only).
            weights = state[stage.ema.target] if stage.ema is not None else None
            checkpointer.save(at_step, state, data_iter=data_iter, config=run_config,
                              weights=weights, force=True)
            last_saved = at_step
            blocked = time.perf_counter() - start  # asynchronous: the device-to-host copy
            totals["checkpoint"] += blocked
            interval["checkpoint"] += blocked

        evals = dict(config.get("evals", {}))
        eval_every = int(t.get("eval_every", 0)) if evals else 0
        if eval_every and jax.process_count() > 1:
            logging.warning("config.evals run in single-process training only: skipped with "
                            "%d processes (evaluate the checkpoints with python -m "
                            "vasa_jax.evaluate)", jax.process_count())
            eval_every = 0

        def run_evals(at_step: int) -> None:
            """config.evals on checkpoint `at_step`: numbers logged as eval/<name>/<key>."""
            from vasa_jax import evaluate as evaluate_lib  # evaluators load their models

            checkpointer.wait()
            for name, spec in evals.items():
                spec = dict(spec)
                kind, data = spec.pop("type"), spec.pop("data", "") or config.data.path
                start = time.perf_counter()
                numbers = evaluate_lib.evaluate_during_training(kind, workdir, data, spec,
                                                                at_step)
                writer.write_scalars(at_step, {f"eval/{name}/{k}": v for k, v in numbers.items()})
                logging.info("eval %s (%s) at step %d in %.1f s: %d numbers", name, kind,
                             at_step, time.perf_counter() - start, len(numbers))

        pending: list[Metrics] = []
        max_bad = int(t.get("max_bad_steps", 10))
        bad_streak, diverged = 0, False  # consecutive skipped steps, up to the last log step
        budget = 60.0 * float(t.get("max_minutes", 0.0))  # 0 = no time budget
        loop_start = time.perf_counter()
        interval_start, data_wait, excluded = time.perf_counter(), 0.0, 0.0
        interval_skipped = skipped

        def log_interval() -> None:
            """Logs the metrics of the steps in `pending` (one host transfer) and counts
            their skipped steps; sets `diverged` once max_bad of them came in a row."""
            nonlocal pending, last_metrics, interval_start, data_wait, excluded
            nonlocal interval_skipped, skipped_steps, bad_streak, diverged
            host = _host(pending)
            bad = [bool(m[SKIPPED] > 0) for m in host]
            for b in bad:
                bad_streak = bad_streak + 1 if b else 0
                diverged = diverged or (max_bad > 0 and bad_streak >= max_bad)
            skipped_steps += sum(bad)
            totals["skipped"] += sum(bad)
            good = [m for m, b in zip(host, bad) if not b] or host  # NaN means if all bad
            means = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k != SKIPPED}
            wall = time.perf_counter() - interval_start - excluded
            totals["steps"] += max(0.0, wall - data_wait)
            step_seconds = wall / len(pending)
            share = min(1.0, data_wait / wall) if wall > 0 else 0.0
            last_metrics = {
                **means, "perf/step_seconds": step_seconds, "perf/data_wait": share,
                "perf/checkpoint_seconds": interval["checkpoint"],
                "perf/compile_seconds": interval["compile"],
                "data/skipped_records": float(interval_skipped),
                SKIPPED_STEPS: float(skipped_steps),
            }
            writer.write_scalars(step, last_metrics)
            if main:
                logging.info(logger_lib.progress_line(
                    step, t.total_steps, means, step_seconds=step_seconds,
                    data_wait=share, eta_seconds=step_seconds * (t.total_steps - step),
                    keys=stage.progress_keys))
                if any(bad):
                    logging.warning("%d of the last %d steps had a NaN/inf loss or gradient and "
                                    "were skipped (%d in this run)", sum(bad), len(bad),
                                    skipped_steps)
            pending = []
            interval_start, data_wait, excluded = time.perf_counter(), 0.0, 0.0
            interval_skipped = 0
            interval.update(compile=0.0, checkpoint=0.0)

        with _StopRequest() as stop:
            while step < t.total_steps:
                if batch is None:
                    start = time.perf_counter()
                    batch, skipped = next_batch()
                    waited = time.perf_counter() - start
                    data_wait += waited
                    totals["data_wait"] += waited
                    interval_skipped += skipped
                state, metrics = compiled(state, batch, np.int32(step), frozen)
                batch = None
                step += 1
                pending.append(metrics)

                log_now = step % t.log_every == 0 or step == t.total_steps
                if log_now:
                    log_interval()

                save_now = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
                images_now = make_images and (step % t.image_every == 0
                                              or step == t.total_steps)
                if save_now or images_now:  # the device finishing its steps is step time
                    jax.block_until_ready(state)
                start = time.perf_counter()
                if diverged:
                    stop_reason = (
                        f"stopped at step {step}: {max_bad} steps in a row had a NaN/inf loss "
                        f"or gradient (train.max_bad_steps={max_bad}; {skipped_steps} skipped in "
                        "all); their updates were discarded, so the checkpoint holds the last "
                        "good state: lower the learning rate or check the data, then resume")
                    logging.error(stop_reason)
                    stopped = step < t.total_steps
                    break
                if images_now:
                    write_images(step)
                if save_now:
                    save(step)
                if eval_every and (step % eval_every == 0 or step == t.total_steps):
                    if last_saved != step:
                        save(step)
                    run_evals(step)
                # train.max_minutes: checked at log steps, so all processes agree on it.
                out_of_time = (budget > 0 and log_now
                               and time.perf_counter() - loop_start > budget)
                if out_of_time:
                    logging.warning("train.max_minutes=%g reached at step %d",
                                    t.max_minutes, step)
                # Several processes must stop at the same step: a local Ctrl-C is agreed on
                # at log steps (a collective); preemption reaches all through orbax.
                if jax.process_count() == 1:
                    stop_now = stop.requested or out_of_time
                else:
                    stop_now = log_now and _all_agree_to_stop(stop.requested or out_of_time)
                preempted = checkpointer.reached_preemption(step)
                excluded += time.perf_counter() - start
                if (stop_now or preempted) and step < t.total_steps:
                    logging.warning("stopping early at step %d", step)
                    stopped = True
                    break
        if pending:  # stopped between log steps: the partial interval
            log_interval()

        if last_saved != step:  # the final (or stop-time) checkpoint
            save(step)
        start = time.perf_counter()
        checkpointer.wait()
        totals["checkpoint"] += time.perf_counter() - start
        ran = step - first_step
        goodput = logger_lib.goodput_summary(
            wall=time.perf_counter() - call_start,
            productive=totals["steps"] * (ran - totals["skipped"]) / max(ran, 1),
            compile=totals["compile"], data_wait=totals["data_wait"],
            checkpoint=totals["checkpoint"])
        if main:
            logging.info(logger_lib.goodput_line(goodput, first_step, step))
        writer.write_summary(step, {"start_step": first_step, "skipped_steps": skipped_steps,
                                    **goodput})
        return TrainResult(step, graphdef, state, last_metrics, compile_seconds, memory, stopped,
                           skipped_steps, stop_reason, goodput, run_config)
    finally:
        checkpointer.close()  # waits for pending asynchronous saves
        writer.close()


# ------------------------------------------------------------------------------ exports
# The helper networks (head-pose pre-training, face-ID, expression meter) end their runs with
# a params-only export in the workdir: <workdir>/params plus a JSON file, the format their
# loaders read (load_pose_params, load_face_id, load_expression_meter), so the run folder
# is what every consumer is given.


def train_and_export(config: ml_collections.ConfigDict, workdir: str,
                     make_stage: Callable[[ml_collections.ConfigDict], Stage], *,
                     meta_file: str, params_dir: str,
                     export: Callable[[TrainResult, float], None],
                     compiler_options=None) -> TrainResult:
    """`train` for a network whose consumers read a params-only export (the helper nets):
    trains in `workdir`, then, once the run is finished (result.step >= total steps, not
    stopped early), calls export(result, seconds since the start) to write params_dir +
    meta_file into `workdir`, first removing an older export unless its meta_file records
    this step ("train": {"steps": ...}): a finished run re-run exports nothing, one extended
    to more steps exports again. The meta file goes last: its presence marks a complete
    export. FileExistsError up front when `workdir` holds an export but no run (one made
    elsewhere, which this run would overwrite). Single-process runs only export (with
    several processes a warning says to re-run the command on one: it finds the run
    finished and exports)."""
    meta_path = os.path.join(workdir, meta_file)
    if os.path.exists(meta_path) and not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        raise FileExistsError(f"{workdir!r} holds an export ({meta_file}) but no run "
                              f"({CHECKPOINT_DIR}/): train into a new --workdir")
    start = time.perf_counter()
    result = train(config, workdir, make_stage, compiler_options=compiler_options)
    if result.step < config.train.total_steps or result.stopped_early:
        return result
    if jax.process_count() > 1:
        logging.warning("the params-only export is written by single-process runs: run the "
                        "same command again in one process (it resumes the finished run and "
                        "exports it)")
        return result
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("train", {}).get("steps") == result.step:
                logging.info("%s already exports step %d", workdir, result.step)
                return result
        os.remove(meta_path)
    shutil.rmtree(os.path.join(workdir, params_dir), ignore_errors=True)
    export(result, time.perf_counter() - start)
    return result


def logged_history(workdir: str, keys: Mapping[str, str], last_step: int) -> list[dict]:
    """[{"step": s, name: value}] from metrics.jsonl for the steps <= last_step that logged
    the metrics `keys` ({name in the history: logged metric}), the latest record of a step
    (a resumed run logs again the steps after its checkpoint)."""
    by_step = {}
    for record in logger_lib.read_metrics(workdir):
        if record["step"] <= last_step and all(k in record for k in keys.values()):
            by_step[record["step"]] = {"step": record["step"],
                                       **{name: record[k] for name, k in keys.items()}}
    return [by_step[s] for s in sorted(by_step)]


def config_json(config: ml_collections.ConfigDict) -> dict:
    """The config as a JSON-ready dict (references resolved), for an export's JSON."""
    return json.loads(config.to_json_best_effort())
