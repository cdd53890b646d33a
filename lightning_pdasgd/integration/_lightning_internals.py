"""Every private Lightning internal this package touches, in one place.

Read from lightning 2.6.6 and pytorch-lightning 2.6.6. When either moves, this is the only module to re-check; the
torch internals are in ``engine/_torch_internals.py``.

Flavour-aware: like the other Lightning-facing modules it loads once per Lightning package (``_flavor.py``), and
reads Lightning's helpers from the package its copy was loaded for (``lightning.fabric`` or ``lightning_fabric``),
only inside the function that needs them.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_pdasgd import _flavor

LIGHTNING_VERSION_READ = "2.6.6"
PYTORCH_LIGHTNING_VERSION_READ = "2.6.6"


def _fabric(module: str) -> ModuleType:
    """``lightning.fabric.<module>`` or ``lightning_fabric.<module>``: the flavour this copy was loaded for."""
    return importlib.import_module(f"{_flavor.for_module(__name__).fabric}.{module}")


def _pytorch(module: str) -> ModuleType:
    """``lightning.pytorch.<module>`` or ``pytorch_lightning.<module>``: the flavour this copy was loaded for."""
    return importlib.import_module(f"{_flavor.for_module(__name__).pytorch}.{module}")


def subprocess_script_launcher_class() -> type:
    """Lightning's launcher that re-runs the user's script once per local device (what ``strategy="ddp"`` uses).

    The Trainer kills the child processes on Ctrl-C only if ``isinstance(launcher, _SubprocessScriptLauncher)`` of
    its own package (``trainer/call.py``), so ``one_process_per_device.py`` subclasses this flavour's class.
    """
    return _pytorch("strategies.launchers.subprocess_script")._SubprocessScriptLauncher  # type: ignore[no-any-return]


def register_virtual_subclasses(trainer_flavor: _flavor.Flavor, strategy: type, launcher: type) -> None:
    """Make ``trainer_flavor``'s Trainer accept a strategy (and its launcher) built on the other package.

    Both base classes are ABCs, so ``register`` makes ``isinstance`` true for the accelerator connector's
    ``Strategy`` check, ``trainer.distributed_sampler_kwargs``' ``ParallelStrategy`` check and ``call.py``'s launcher
    check; every check of our own reads the Trainer's flavour (``_flavor.every_imported``). Verified exact on 2.6.6.
    """
    trainer_flavor.module("strategies").ParallelStrategy.register(strategy)
    trainer_flavor.module("strategies.launchers.subprocess_script")._SubprocessScriptLauncher.register(launcher)


def init_process_group(cluster_environment: object, backend: str, timeout: object, device: object) -> None:
    """Lightning's own process-group initialisation (what ``DDPStrategy.setup_distributed`` calls).

    Under torchrun with restarts, workers of every attempt share torchrun's key-value store, and a process group
    created after the default one (the exchange's) can read the previous attempt's stale addresses and hang in
    gloo's connect (reproduced on torch 2.14.1 with plain ``init_process_group`` + ``new_group``). Giving the
    default group a store prefixed by the attempt number keeps every attempt's keys apart.
    """
    kwargs: dict[str, object] = {"timeout": timeout, "device_id": device}
    store = _elastic_attempt_store(timeout)
    if store is not None:
        kwargs["store"] = store
    _fabric("utilities.distributed")._init_dist_connection(cluster_environment, backend, **kwargs)


def init_process_groups(
    cluster_environment: object, backend: str | None, device: torch.device, timeout: object, exchange_timeout: object
) -> tuple[str, object]:
    """The default process group (Lightning's own initialisation) and a second one for the exchange thread.

    Lightning's barriers and ``sync_dist`` keep the default group; the exchange's collectives never share it.
    Returns the backend used and the exchange's group.
    """
    import torch.distributed as dist

    backend = backend or default_process_group_backend(device)
    init_process_group(cluster_environment, backend, timeout, device if device.type != "cpu" else None)
    return backend, dist.new_group(backend=backend, timeout=exchange_timeout)


def _elastic_attempt_store(timeout: object) -> object | None:
    import os
    from datetime import timedelta

    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout if isinstance(timeout, timedelta) else timedelta(minutes=30),
    )
    return dist.PrefixStore(f"/pdasgd/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", client)


def sync_ddp_if_available(tensor: torch.Tensor, group: object, reduce_op: object) -> torch.Tensor:
    """Lightning's all-reduce for ``self.log(..., sync_dist=True)`` (what ``DDPStrategy.reduce`` calls)."""
    return _fabric("utilities.distributed")._sync_ddp_if_available(  # type: ignore[no-any-return]
        tensor, group, reduce_op=reduce_op
    )


def distributed_is_initialized() -> bool:
    """Lightning's check that torch.distributed is available and its default group initialised."""
    return bool(_fabric("utilities.distributed")._distributed_is_initialized())


def default_process_group_backend(device: torch.device) -> str:
    return _fabric("utilities.distributed")._get_default_process_group_backend_for_device(  # type: ignore[no-any-return]
        device
    )


def optimizers_to_device(optimizers: list[Optimizer], device: torch.device) -> None:
    """Move optimizer state to the device, as every Lightning strategy's ``setup`` does."""
    _fabric("utilities.optimizer")._optimizers_to_device(optimizers, device)


def replace_sigterm_broadcast(trainer: object, check: Callable[[], None]) -> None:
    """Replace the per-batch SIGTERM broadcast of Lightning's training epoch loop.

    ``_TrainingEpochLoop.advance`` broadcasts a SIGTERM flag on the default group before *every* batch when the
    world size is > 1, which would make every rank wait for the slowest one at every step. PD-ASGD carries the
    flag on its own exchange thread instead, and ``check`` raises Lightning's ``SIGTERMException`` when any rank
    got the signal.
    """
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = check  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- Lightning's loop state
# Several devices: `step_accounting.py` keeps Lightning's step counters on the count of batches applied by all ranks.
# These are the private loop objects it reads and advances (lightning 2.6.6: `_TrainingEpochLoop`, `_FitLoop`,
# `trainer.call`).


def global_step(trainer: object) -> int:
    """``trainer.global_step`` in automatic optimization: ``optim_progress.optimizer.step.total.completed``."""
    return int(trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer_steps)  # type: ignore[attr-defined]


def advance_step_counters(trainer: object, steps: int) -> None:
    """Count ``steps`` more optimizer steps: ``global_step`` and the logging step (``_batches_that_stepped``).

    Lightning increments both once per local optimizer step (the second after the batch's hooks); adding the same
    amount to both keeps the relation Lightning relies on.
    """
    epoch_loop = trainer.fit_loop.epoch_loop  # type: ignore[attr-defined]
    epoch_loop.automatic_optimization.optim_progress.optimizer.step.increment_by(steps)
    epoch_loop._batches_that_stepped += steps


def batches_that_stepped(trainer: object) -> int:
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)  # type: ignore[attr-defined]


def advance_batch_counters(trainer: object, batches: int) -> None:
    """Count ``batches`` more batches of the current epoch (ready, started, processed, completed)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress  # type: ignore[attr-defined]
    progress.total.increment_by(batches)
    progress.current.increment_by(batches)


def epoch_batches_ready(trainer: object) -> int:
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)  # type: ignore[attr-defined]


def step_lr_scheduler(trainer: object, config: object) -> None:
    """Step one scheduler the way ``_TrainingEpochLoop._update_learning_rates`` does (user's ``lr_scheduler_step``)."""
    call = _pytorch("trainer.call")
    progress = trainer.fit_loop.epoch_loop.scheduler_progress  # type: ignore[attr-defined]
    progress.increment_ready()
    call._call_lightning_module_hook(trainer, "lr_scheduler_step", config.scheduler, None)  # type: ignore[attr-defined]
    progress.increment_completed()


def set_num_training_batches(trainer: object, batches: int) -> None:
    """``trainer.num_training_batches`` reads ``fit_loop.max_batches`` (used by ``estimated_stepping_batches``)."""
    trainer.fit_loop.max_batches = batches  # type: ignore[attr-defined]


def wrap_loop_methods(
    trainer: object,
    after_setup_data: Callable[[], None],
    update_lr_schedulers: Callable[[Callable[[str, bool], None], str, bool], None],
) -> Callable[[], None]:
    """Replace ``fit_loop.setup_data`` and ``epoch_loop.update_lr_schedulers`` on this trainer's loops only.

    ``setup_data`` runs ``after_setup_data`` after Lightning's own (it may run from
    ``trainer.estimated_stepping_batches`` inside ``configure_optimizers``); ``update_lr_schedulers(original,
    interval, update_plateau_schedulers)`` replaces the call after every batch. Returns the function that undoes
    both (instance attributes removed, the classes' methods visible again).
    """
    fit_loop = trainer.fit_loop  # type: ignore[attr-defined]
    epoch_loop = fit_loop.epoch_loop
    original_setup_data = type(fit_loop).setup_data.__get__(fit_loop)
    original_update = type(epoch_loop).update_lr_schedulers.__get__(epoch_loop)

    def setup_data() -> None:
        original_setup_data()
        after_setup_data()

    def update(interval: str, update_plateau_schedulers: bool) -> None:
        update_lr_schedulers(original_update, interval, update_plateau_schedulers)

    fit_loop.setup_data = setup_data
    epoch_loop.update_lr_schedulers = update

    def undo() -> None:
        fit_loop.__dict__.pop("setup_data", None)
        epoch_loop.__dict__.pop("update_lr_schedulers", None)

    return undo


def syncs_batchnorm(strategy: object) -> bool:
    """``Trainer(sync_batchnorm=True)``: the accelerator connector hands the strategy a ``LayerSync`` plugin as
    ``_layer_sync``, for the strategy to apply to the model at setup (``DDPStrategy.setup``)."""
    return getattr(strategy, "_layer_sync", None) is not None


def saves_mid_epoch(checkpoint_callback: object) -> bool:
    """Whether a ``ModelCheckpoint`` saves every N training steps or every time interval (its private triggers)."""
    every_n_train_steps = getattr(checkpoint_callback, "_every_n_train_steps", 0)
    return bool(every_n_train_steps) or getattr(checkpoint_callback, "_train_time_interval", None) is not None


# ----------------------------------------------------------------------------------------------- the precision plugin
# A step's loss reaches the engine where Lightning's `Strategy.backward` hands it to the precision plugin
# (lightning 2.6.6: `Strategy.backward` calls `precision_plugin.pre_backward`, `.backward`, `.post_backward`). The
# strategy keeps Lightning's `Strategy.backward` itself, so code that wraps or counts it sees Lightning's method.
# Routing sets the two methods on the plugin instance; `undo` removes them (the class's methods show through again).

_ROUTED = ("backward", "post_backward")


def route_precision_backward(plugin: object, backward: Callable[..., Any], post_backward: Callable[..., Any]) -> None:
    """``plugin.backward(...)`` becomes ``backward(own_backward, ...)``, and the same for ``post_backward``."""
    unroute_precision_backward(plugin)
    own_backward, own_post_backward = plugin.backward, plugin.post_backward  # type: ignore[attr-defined]
    plugin.backward = functools.partial(backward, own_backward)  # type: ignore[attr-defined]
    plugin.post_backward = functools.partial(post_backward, own_post_backward)  # type: ignore[attr-defined]


def unroute_precision_backward(plugin: object) -> None:
    for name in _ROUTED:
        vars(plugin).pop(name, None)


def set_current_epoch(trainer: object, epoch: int) -> None:
    """Start the fit loop at ``epoch`` (a fault-tolerant replica joining a running job): the epoch counters a
    checkpoint of the end of ``epoch - 1`` would restore."""
    progress = trainer.fit_loop.epoch_progress  # type: ignore[attr-defined]
    for counters in (progress.current, progress.total):
        counters.ready = counters.started = counters.processed = counters.completed = epoch


def callbacks_state(trainer: object) -> dict[str, Any]:
    """Every callback's ``state_dict``, as a checkpoint holds them (``trainer/call.py``)."""
    return _pytorch("trainer.call")._call_callbacks_state_dict(trainer)  # type: ignore[no-any-return]


def load_callbacks_state(trainer: object, states: dict[str, Any]) -> None:
    """Give every callback its state from ``callbacks_state`` of another replica's trainer."""
    _pytorch("trainer.call")._call_callbacks_load_state_dict(trainer, {"callbacks": states})


def retire_step_metrics(trainer: object, names: frozenset[str]) -> None:
    """Mark the ``on_step`` values logged under ``names`` as consumed (``_ResultMetric.has_reset``): Lightning
    otherwise re-reads every value logged in the epoch at every later batch end (``_ResultCollection.metrics``), a
    cost per key and step. The loggers, ``callback_metrics`` and the progress bar keep the last values; logging the
    key again makes it live again (``update_metrics``)."""
    results = getattr(trainer, "_results", None)
    if results is None:
        return
    for metric in results.values():
        meta = getattr(metric, "meta", None)  # (a `_ResultMetric`; anything else is left as it is)
        if meta is not None and meta.name in names and meta.on_step and not meta.on_epoch:
            metric.has_reset = True


def update_logged_step_values(
    module: Any, values: dict[str, float], prog_bar: bool, logger: bool
) -> dict[str, float]:
    """Give keys already logged in this hook with these settings (``on_step`` only) their new values, as
    ``self.log`` does once a key exists, without its move of each value's metric to its device (``_ResultMetric.to``:
    a walk over the metric's attributes, about 0.3 ms a key on a CPU). Returns what still needs ``self.log``: keys
    not logged yet in this hook, the first log after a hook change (Lightning resets there), other settings."""
    trainer = getattr(module, "_trainer", None)
    results = getattr(trainer, "_results", None)
    connector = getattr(trainer, "_logger_connector", None)
    fx = getattr(module, "_current_fx_name", None)
    if results is None or connector is None or fx is None or connector.should_reset_tensors(fx):
        return values
    dtype = _pytorch("trainer.connectors.logger_connector.result")._get_default_dtype()
    rest: dict[str, float] = {}
    for name, value in values.items():
        metric = results.get(f"{fx}.{name}")
        meta = getattr(metric, "meta", None)
        settings = None if meta is None else (meta.on_step, meta.on_epoch, meta.prog_bar, meta.logger, meta.sync.should)
        if settings != (True, False, prog_bar, logger, False) or not getattr(metric, "is_tensor", False):
            rest[name] = value
            continue
        results.update_metrics(f"{fx}.{name}", torch.tensor(value, device=module.device, dtype=dtype), 1)
    if len(rest) < len(values):
        connector._current_fx = fx  # what `self.log` leaves behind
    return rest

