"""Setup-time checks: settings that cannot work with per-parameter asynchronous updates fail here, by name.

Each error says which setting is the problem and what to use instead, before any thread starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor
from torch.jit import ScriptModule
from torch.nn import SyncBatchNorm
from torch.optim import LBFGS, Optimizer

from lightning_pdasgd import _flavor

from . import _lightning_internals
from ._lightning import Callback, MisconfigurationException, rank_zero_warn
from ._lightning import pytorch as pl

# Hooks that in a synchronous step see the whole model's gradient in `.grad`; under PD-ASGD no such moment exists.
GRADIENT_HOOKS = ("on_after_backward", "on_before_optimizer_step")
MODULE_GRADIENT_HOOKS = (*GRADIENT_HOOKS, "backward", "configure_gradient_clipping")


ONE_OPTIMIZER_ADVICE = (
    " PD-ASGD steps exactly one optimizer, bucket by bucket. Put parameters that need other hyperparameters into"
    " param groups of one optimizer, e.g. `torch.optim.Adam([{'params': self.encoder.parameters(), 'lr': 1e-4},"
    " {'params': self.head.parameters()}], lr=1e-3)`. Training that alternates optimizers by hand (GANs) needs"
    " manual optimization (`self.automatic_optimization = False`), which PD-ASGD runs as Lightning's own"
    " synchronous step on one device."
)


@contextmanager
def one_optimizer_advice() -> Iterator[None]:
    """Turn Lightning's "multiple optimizers need manual optimization" into PD-ASGD's advice.

    Lightning suggests `automatic_optimization = False`, which PD-ASGD runs only as Lightning's own synchronous
    step: the user should hear both ways out. Its error stays attached as the cause.
    """
    try:
        yield
    except RuntimeError as error:
        if "multiple optimizers" not in str(error):
            raise
        raise MisconfigurationException(
            "`configure_optimizers` returned multiple optimizers." + ONE_OPTIMIZER_ADVICE
        ) from error


def check_fit_configuration(
    trainer: pl.Trainer, module: pl.LightningModule, optimizers: list[Optimizer], world_size: int
) -> None:
    """Every setup-time check of a fit, before any thread starts."""
    if world_size > 1:
        check_multi_device_settings(trainer)
        check_no_batchnorm_sync(trainer, module)
    check_trainer_settings(trainer, module, optimizers)


def check_trainer_settings(trainer: pl.Trainer, module: pl.LightningModule, optimizers: list[Optimizer]) -> None:
    """Raise for every setting whose meaning needs a synchronous whole-model step."""
    if not module.automatic_optimization:
        if trainer.world_size > 1:
            raise MisconfigurationException(
                "PD-ASGD runs manual optimization (`self.automatic_optimization = False`) as Lightning's own"
                f" synchronous step on one device only; with {trainer.world_size} devices the ranks would count"
                " `global_step` (your optimizer steps) apart. Train this module on one device, or with"
                " `strategy='ddp'`."
            )
        return  # the user steps the optimizers: every optimizer and closure of plain Lightning works
    if no_optimizer(optimizers):
        return  # `configure_optimizers` returned None: Lightning's own step, which updates nothing
    if not has_one_trainable_optimizer(optimizers):
        raise MisconfigurationException(
            f"PD-ASGD needs exactly one optimizer from `configure_optimizers`, got {len(optimizers)}"
            " (or one without parameters)." + ONE_OPTIMIZER_ADVICE
        )
    optimizer = optimizers[0]
    if isinstance(optimizer, LBFGS):
        raise MisconfigurationException(
            "PD-ASGD applies each parameter's update without a closure; `torch.optim.LBFGS` re-evaluates the loss"
            " through one. Use an element-wise optimizer (SGD, Adam, AdamW, RMSprop, ...)."
        )
    if accumulates_gradients(trainer) and trainer.world_size > 1:
        raise MisconfigurationException(
            "PD-ASGD accumulates gradients on one device only so far: `Trainer(accumulate_grad_batches=...)` (or a"
            f" `GradientAccumulationScheduler`) with {trainer.world_size} devices is not supported. Use"
            " accumulate_grad_batches=1 with a larger batch size per device, or train on one device."
        )
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        raise MisconfigurationException(
            f"`Trainer(precision={trainer.precision!r})` uses a GradScaler, whose unscale and inf check need every"
            " gradient of a step at once. Use `precision='bf16-mixed'` (no scaler) or `'32-true'` with PD-ASGD."
        )


def no_optimizer(optimizers: list[Optimizer]) -> bool:
    """``configure_optimizers`` returned None: Lightning trains with a stand-in that updates nothing."""
    return len(optimizers) == 1 and type(optimizers[0]).__name__ == "_MockOptimizer"


def has_one_trainable_optimizer(optimizers: list[Optimizer]) -> bool:
    """Exactly one optimizer, holding at least one parameter: what the engine's buckets are built from."""
    return len(optimizers) == 1 and any(group["params"] for group in optimizers[0].param_groups)


def trains_a_parameter(optimizers: list[Optimizer]) -> bool:
    """Some optimizer holds a parameter that requires grad now."""
    return any(param.requires_grad for optimizer in optimizers for group in optimizer.param_groups
               for param in group["params"])


def gradient_clipping(trainer: pl.Trainer) -> tuple[float | None, float | None]:
    """``(clip_value, clip_norm)``: the Trainer's ``gradient_clip_val`` under its algorithm (``"norm"`` by default)."""
    clip = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None
    return (clip, None) if trainer.gradient_clip_algorithm == "value" else (None, clip)


def accumulates_gradients(trainer: pl.Trainer) -> bool:
    """Whether the fit sums gradients over several batches (``accumulate_grad_batches`` now, or a scheduler that
    sets it later): the engine then keeps accumulation windows (``accumulation.py``)."""
    GradientAccumulationScheduler = _flavor.every_imported("callbacks.GradientAccumulationScheduler")
    scheduled = any(
        isinstance(callback, GradientAccumulationScheduler) and any(f != 1 for f in callback.scheduling.values())
        for callback in trainer.callbacks
    )
    return scheduled or trainer.accumulate_grad_batches != 1


def gradient_hook_overrides(module: pl.LightningModule, callbacks: list[Callback]) -> list[str]:
    """The overridden hooks that expect the whole model's gradient in `.grad` (``"Class.hook"``)."""
    overridden = [
        f"{type(module).__name__}.{name}"
        for name in MODULE_GRADIENT_HOOKS
        if getattr(type(module), name, None) not in _flavor.inherited("LightningModule", name)
    ]
    overridden += [  # a method of the callback's class, or one set on the instance (``LambdaCallback``)
        f"{type(callback).__name__}.{name}"
        for callback in callbacks
        for name in GRADIENT_HOOKS
        if name in vars(callback)
        or getattr(type(callback), name, None) not in _flavor.inherited("callbacks.Callback", name)
    ]
    return overridden


def synchronous_reason(
    module: pl.LightningModule, callbacks: list[Callback], gradient_hooks: str, optimizers: list[Optimizer]
) -> str | None:
    """Why this fit must run Lightning's own synchronous step instead of the engine (``None``: it need not).

    Manual optimization steps the optimizers itself, without an optimizer nothing is updated, TorchScript holds its
    modules' parameters out of the engine's reach, and a hook that reads or changes the whole model's gradient needs
    the moment a synchronous step has and PD-ASGD does not: all get exactly Lightning's step rather than user code
    silently not run. ``gradient_hooks="skip"`` keeps the engine and leaves the hooks uncalled.
    """
    if not module.automatic_optimization:
        return "this LightningModule uses manual optimization (`self.automatic_optimization = False`)"
    if no_optimizer(optimizers):
        return "`configure_optimizers` returned no optimizer, so there is nothing to update"
    scripted: list[str] = []  # the outermost TorchScript modules (their submodules are TorchScript too)
    for name, submodule in module.named_modules():
        if isinstance(submodule, ScriptModule) and not any(name.startswith(f"{outer}.") for outer in scripted):
            scripted.append(name or type(module).__name__)
    if scripted:
        return (
            f"TorchScript modules ({', '.join(scripted[:3])}) read their parameters inside TorchScript, where PD-ASGD"
            " cannot give each forward the weights it read. To train asynchronously, keep those modules as Python"
            " modules (`torch.compile` works)"
        )
    overridden = gradient_hook_overrides(module, callbacks)
    if not overridden:
        return None
    if gradient_hooks == "skip":
        rank_zero_warn(
            f"PD-ASGD never holds a whole-model gradient in `.grad`, so these overrides are not called"
            f" (`gradient_hooks='skip'`): {overridden}. For gradient statistics use"
            " `PDASGDStrategy(log_grad_norm=True)` (logs `pdasgd/grad_norm`); for clipping use"
            " `Trainer(gradient_clip_val=...)` (by norm, per backward, or `gradient_clip_algorithm='value'`)."
        )
        return None
    return (
        f"{', '.join(overridden)} expect(s) the whole model's gradient in `.grad`, which only a synchronous step"
        " has. To train asynchronously, remove the override (`PDASGDStrategy(log_grad_norm=True)` logs gradient"
        " norms; `Trainer(gradient_clip_val=...)` clips) or pass `PDASGDStrategy(gradient_hooks='skip')`, which"
        " leaves them uncalled"
    )


def check_multi_device_settings(trainer: pl.Trainer) -> None:
    """With several devices, ranks run at their own pace: refuse what needs every rank at one point mid-epoch.

    ``max_steps`` and ``limit_train_batches`` count the batches of all ranks together (``step_accounting.py``); what
    is refused here would stop or validate each rank at a point of its own.
    """
    Timer = _flavor.every_imported("callbacks.Timer")  # the Trainer may be either package's
    ModelCheckpoint = _flavor.every_imported("callbacks.ModelCheckpoint")

    if any(isinstance(callback, Timer) for callback in trainer.callbacks):
        raise MisconfigurationException(
            "`Trainer(max_time=...)` with several devices: each PD-ASGD rank would see the time run out at its own"
            " batch, mid-epoch, and the ranks could not meet to stop together. Use `max_epochs` or `max_steps` (the"
            " batches of all ranks together)."
        )
    if trainer.val_check_interval != 1.0 or trainer.check_val_every_n_epoch is None:
        raise MisconfigurationException(
            f"`Trainer(val_check_interval={trainer.val_check_interval!r},"
            f" check_val_every_n_epoch={trainer.check_val_every_n_epoch!r})` with several devices: ranks reach"
            " mid-epoch points at different times, and validation is a point where all ranks meet. Validate at epoch"
            " ends (`val_check_interval=1.0`, optionally `check_val_every_n_epoch=N`)."
        )
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and _lightning_internals.saves_mid_epoch(callback):
            raise MisconfigurationException(
                "`ModelCheckpoint(every_n_train_steps=...)` or `train_time_interval` with several devices: each"
                " PD-ASGD rank reaches those points mid-epoch at its own time, so the ranks would save different"
                " replicas under different names. Save at epoch ends or after validation (`every_n_epochs`, the"
                " default), where every rank agrees on the step, the weights and the file name."
            )


def check_no_batchnorm_sync(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    """Refuse synchronized BatchNorm on several devices rather than ignore it.

    SyncBatchNorm all-reduces every BatchNorm layer's batch statistics in each forward and each backward, so every rank
    must be at the same layer of the same step. PD-ASGD's ranks run at their own pace, and on each rank several
    backward passes run at once, so they never meet there (and ``sync_batchnorm=True`` silently doing nothing would
    train something other than what was asked).
    """
    synced = [name for name, submodule in module.named_modules() if isinstance(submodule, SyncBatchNorm)]
    if not synced and not _lightning_internals.syncs_batchnorm(trainer.strategy):
        return
    what = (
        f"`torch.nn.SyncBatchNorm` layers ({', '.join(synced[:3])}{', ...' if len(synced) > 3 else ''})"
        if synced
        else "`Trainer(sync_batchnorm=True)`"
    )
    undo = (
        "convert them back with `lightning.pytorch.plugins.TorchSyncBatchNorm().revert(model)`"
        if synced
        else "leave `sync_batchnorm` off"
    )
    raise MisconfigurationException(
        f"{what} with {trainer.world_size} devices: synchronized BatchNorm all-reduces each layer's batch statistics"
        " in every forward and backward, so all ranks must be at the same layer of the same step, which PD-ASGD's"
        " ranks (each at its own pace, with backward passes running concurrently) never are. To train with"
        f" PD-ASGD, {undo}: each rank then normalizes over its own batch, as DDP does by default. To keep"
        " synchronized statistics, use `strategy='ddp'`."
    )


def check_loss(loss: Tensor) -> None:
    """Raise torch's own errors for a loss that cannot be back-propagated, in the main thread, before hand-off."""
    if loss.numel() != 1:
        raise RuntimeError(
            f"grad can be implicitly created only for scalar outputs (training_step returned a loss of shape"
            f" {tuple(loss.shape)}; reduce it to a scalar, e.g. with `.mean()`)"
        )
    if not loss.requires_grad:
        raise RuntimeError(
            "element 0 of tensors does not require grad and does not have a grad_fn (the loss returned by"
            " training_step is not connected to any trainable parameter)"
        )
