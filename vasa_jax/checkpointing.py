"""Checkpoints: the one module that imports orbax.

A training checkpoint is a step folder with up to four items:

    <directory>/<step>/state       the train state (any pytree of jax.Arrays, e.g. nnx.State)
    <directory>/<step>/data_iter   the grain iterator position, one file per process
    <directory>/<step>/config      the run's config as JSON (for provenance; never read back
                                   into a run implicitly)
    <directory>/<step>/weights     the parameters inference runs (the stage's EMA module), a
                                   plain nested dict: `restore_weights` reads them without the
                                   optimizer moments or the discriminator

A run's checkpoints live in `<workdir>/checkpoints` (CHECKPOINT_DIR); `open_run` opens them
for reading with the checks every reader needs (a run of the expected stage, a finished step).

Saves are asynchronous: `save` returns once the arrays are copied off the device and the
iterator state is captured; writing happens in the background (`wait()` blocks). Restoring
takes an abstract target whose ShapeDtypeStructs carry the NEW shardings
(`vasa_jax.parallel.sharding.abstract_state`), so a run can resume on a different mesh or
number of hosts. Every process must call `save`/`restore` (they synchronise).

Inference uses small params-only checkpoints (`export_params` / `load_params`): a plain
nested dict of arrays, optionally cast to bf16, loadable without the optimizer.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

STATE = "state"
DATA_ITER = "data_iter"
CONFIG = "config"
WEIGHTS = "weights"
CHECKPOINT_DIR = "checkpoints"  # under a run's workdir


def _path(path: str | os.PathLike) -> epath.Path:
    """Local paths are made absolute (orbax needs that); URIs (gs://...) pass through."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _config_dict(config: Any) -> dict:
    """A JSON-able dict of a ConfigDict / mapping (tuples become lists)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    if isinstance(config, Mapping):
        return json.loads(json.dumps(config, default=str))
    raise TypeError(f"config must be a ConfigDict or a mapping, got {type(config).__name__}")


class Checkpointer:
    """Step checkpoints of (train state, data iterator, config) in one directory.

    Args:
      directory: where step folders go, e.g. `<workdir>/checkpoints`; created if missing.
      max_to_keep: newest checkpoints kept (None = all).
      save_interval_steps: `save` is a no-op on other steps unless `force=True`.
      keep_period: additionally keep every checkpoint whose step is a multiple of this.
      async_save: write in a background thread (the default; `wait()` before reading).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = _path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA_ITER: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
                WEIGHTS: ocp.StandardCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_interval_steps,
                keep_period=keep_period,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    # -------------------------------------------------------------------------- queries

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `save(step)` would write (interval reached or preemption signalled)."""
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True once the cluster announced a preemption: save (force=True) and exit."""
        return self._manager.reached_preemption(step)

    # -------------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iter: grain.DatasetIterator | None = None,
        config: Any = None,
        weights: Any = None,
        force: bool = False,
    ) -> bool:
        """Starts saving `state` (and the iterator position, the config, the inference
        weights: an nnx.State or nested dict of arrays) as `step`.

        Returns whether a save was started (False between `save_interval_steps`). Donated or
        updated arrays are safe to reuse as soon as this returns.
        """
        items = {STATE: ocp.args.StandardSave(state)}
        if weights is not None:
            items[WEIGHTS] = ocp.args.StandardSave(_pure(weights))
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(_config_dict(config))
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    # -------------------------------------------------------------------------- restore

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        return step

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        *,
        data_iter: grain.DatasetIterator | None = None,
    ) -> Any:
        """Restores the state of `step` (default: latest) onto `abstract_state`'s shardings.

        Args:
          abstract_state: tree of jax.ShapeDtypeStruct with `sharding` set (or of arrays,
            whose shardings are used), structured like the saved state.
          data_iter: if given, its position is restored in place (it must come from the same
            pipeline definition, on the same number of processes).
        """
        step = self._step(step)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {STATE: ocp.args.StandardRestore(target)}
        if data_iter is not None:
            if not (self.directory / str(step) / DATA_ITER).exists():
                raise FileNotFoundError(
                    f"checkpoint step {step} in {self.directory} has no data iterator state"
                )
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored[STATE]

    def restore_or_create(
        self,
        abstract_state: Any,
        create_fn: Callable[[], Any],
        *,
        data_iter: grain.DatasetIterator | None = None,
    ) -> tuple[Any, int]:
        """Resume semantics: (latest checkpoint, its step) if any, else (create_fn(), 0).

        The step is the number of finished train steps, i.e. where the loop continues.
        """
        step = self.latest_step()
        if step is None:
            return create_fn(), 0
        return self.restore(abstract_state, step, data_iter=data_iter), step

    def has_weights(self, step: int | None = None) -> bool:
        """Whether `step` (default: latest) has the inference `weights` item (checkpoints
        written before it existed do not)."""
        return (self.directory / str(self._step(step)) / WEIGHTS).exists()

    def restore_weights(self, target: Any = None, step: int | None = None) -> Any:
        """Only the inference weights of `step` (default: latest), placed and cast like
        `target` (an nnx.State, e.g. the abstract state of the module, or a nested dict of
        arrays / ShapeDtypeStructs; see `load_params`). target None: a nested dict of
        arrays on this process's first local device, with the stored shapes and dtypes.
        Raises FileNotFoundError if the step has no weights item."""
        step = self._step(step)
        if not self.has_weights(step):
            raise FileNotFoundError(
                f"checkpoint step {step} in {self.directory} has no {WEIGHTS!r} item (written "
                "before the trainer saved one): restore the whole train state instead")
        if target is None:
            stored = self._manager.item_metadata(step)[WEIGHTS]
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                  getattr(stored, "tree", stored))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _pure(target))
        args = ocp.args.Composite(**{WEIGHTS: ocp.args.StandardRestore(abstract)})
        restored = self._manager.restore(step, args=args)[WEIGHTS]
        logging.info("checkpoint: restored the weights of step %d from %s", step, self.directory)
        return _like(target, restored)

    def restore_module(self, build: Callable[[], nnx.Module], mesh: jax.sharding.Mesh,
                       rules: Any, step: int | None = None) -> nnx.Module:
        """The inference module of `step` (default: latest), e.g. the EMA generator: `build`
        makes the module's structure (abstractly: nothing is initialised), the weights item
        fills it, placed on `mesh` by the logical-axis `rules`."""
        from vasa_jax.parallel import sharding  # light; kept local like the orbax handlers

        graphdef, abstract, _ = sharding.abstract_state(build, mesh, rules)
        return nnx.merge(graphdef, self.restore_weights(abstract, step))

    def restore_config(self, step: int | None = None) -> dict:
        """The config dict saved with `step` (default: latest), JSON lists turned back into
        the tuples configs use (ready for `ml_collections.ConfigDict`)."""
        step = self._step(step)
        args = ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        return _tuples(self._manager.restore(step, args=args)[CONFIG])

    # -------------------------------------------------------------------------- lifetime

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run(workdir: str | os.PathLike, stage: str, step: int | None = None
             ) -> tuple[Checkpointer, int, dict]:
    """Opens a training run's checkpoints for reading: (checkpointer, step, config dict).

    step: None -> the latest finished one. Raises FileNotFoundError (no such workdir, not a
    training run, no finished checkpoint, no such step), NotADirectoryError (the workdir is a
    file) or ValueError (a run of another
    stage than `stage`, e.g. "face_latent"). The caller closes the checkpointer (it is a
    context manager).
    """
    workdir = os.fspath(workdir)
    if "://" not in workdir and os.path.isfile(workdir):
        raise NotADirectoryError(f"workdir {workdir!r} is a file, not a run folder")
    if "://" not in workdir and not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    directory = _path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():  # checked first: a Checkpointer would create the folder
        raise FileNotFoundError(
            f"{workdir!r} has no {CHECKPOINT_DIR}/ folder: not a training run (train one with "
            f"`python train.py --config configs/{stage}.py --workdir W ...`)")
    ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no finished checkpoint in {directory}")
        step = ckpt._step(None if step is None else int(step))
        config = ckpt.restore_config(step)
        if config.get("stage") != stage:
            raise ValueError(f"{workdir!r} holds a {config.get('stage')!r} run, not {stage!r}")
    except Exception:
        ckpt.close()
        raise
    return ckpt, step, config


# ------------------------------------------------------------------------------ params only


def _tuples(x: Any) -> Any:
    """JSON lists -> tuples, recursively."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def _pure(tree: Any) -> Any:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _like(target: Any, restored: dict) -> Any:
    """`restored` (a pure dict) as an nnx.State shaped like `target` if that is one."""
    if isinstance(target, nnx.State):
        state = jax.tree.map(lambda x: x, target)  # a copy: replace_by_pure_dict works in place
        nnx.replace_by_pure_dict(state, restored)
        return state
    return restored


def export_module(path: str, module: nnx.Module, params_dir: str, meta_file: str,
                  meta: Mapping[str, Any]) -> None:
    """A small network's export: PATH/params_dir (`export_params` of the module's
    nnx.Params; FileExistsError if present: never overwritten) and PATH/meta_file (JSON
    `meta`: its architecture and training record), written last, so its presence marks a
    complete export."""
    os.makedirs(path, exist_ok=True)
    export_params(os.path.join(path, params_dir), nnx.state(module, nnx.Param))
    with open(os.path.join(path, meta_file), "w") as f:
        json.dump(dict(meta), f, indent=2, sort_keys=True)


def export_params(path: str | os.PathLike, params: Any, *, dtype: Any = None) -> None:
    """Writes a params-only checkpoint (synchronously) for inference.

    Args:
      path: a new directory (an existing one is an error: exports are never overwritten).
      params: nnx.State (e.g. `nnx.state(model, nnx.Param)`) or a nested dict of arrays;
        stored as a plain nested dict, so loading needs no optimizer or train state.
      dtype: if given (e.g. jnp.bfloat16), floating-point leaves are cast to it.
    """
    path = _path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; params exports are never overwritten")
    tree = _pure(params)
    if dtype is not None:
        tree = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
        )
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()
    logging.info("exported params to %s", path)


def load_params(path: str | os.PathLike, target: Any = None) -> Any:
    """Loads a checkpoint written by `export_params`.

    Args:
      target: None -> a nested dict of arrays on this process's first local device, with the
        stored dtypes. An nnx.State or nested dict of arrays / ShapeDtypeStructs -> values are
        placed with the target's shardings and cast to its dtypes; an nnx.State target gives
        an nnx.State back (apply it with `nnx.update(model, params)`).
    """
    path = _path(path)
    if not path.exists():
        raise FileNotFoundError(f"no params checkpoint at {path}")
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            stored = checkpointer.metadata(path).item_metadata
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored
            )
            return checkpointer.restore(path, abstract)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _pure(target))
        restored = checkpointer.restore(path, abstract)
    return _like(target, restored)
