"""Every private torch internal this package touches, in one place.

Read from torch 2.14.1. When torch moves, this is the only module to re-check; the Lightning internals are in
``integration/_lightning_internals.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

TORCH_VERSION_READ = "2.14.1"


# ----------------------------------------------------------------------------------------------- torch's foreach ops
# The multi-tensor kernels torch's own optimizers use (one call per list of tensors). Their names are private
# (``torch._foreach_*``) but they are the documented building blocks of ``foreach=True`` optimizers.


def foreach_copy_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``target.copy_(source)`` for every pair, in one call."""
    torch._foreach_copy_(list(targets), list(sources))


def foreach_add_difference_(
    targets: Sequence[torch.Tensor], new: Sequence[torch.Tensor], old: Sequence[torch.Tensor]
) -> None:
    """``target += new - old`` for every triple, in two calls."""
    torch._foreach_add_(list(targets), torch._foreach_sub(list(new), list(old)))


def foreach_clamp_(tensors: Sequence[torch.Tensor], bound: float) -> None:
    """Clamp every element of every tensor to ``[-bound, bound]`` in place (gradient clipping by value)."""
    torch._foreach_clamp_min_(list(tensors), -bound)
    torch._foreach_clamp_max_(list(tensors), bound)


def foreach_scale_to_norm_(tensors: Sequence[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale tensors whose total norm is ``total_norm`` to at most ``max_norm``, with the coefficient and kernels
    of ``torch.nn.utils.clip_grads_with_norm_`` (which takes parameters, not the gradients themselves)."""
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    torch._foreach_mul_(list(tensors), coefficient.to(tensors[0].device))


def foreach_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each tensor (one reduction per tensor, no per-element temporary)."""
    return list(torch._foreach_norm(list(tensors)))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite.

    One L2 reduction per tensor decides the common case; only when a norm is not finite (a NaN or Inf, or a
    finite tensor whose squares overflow) does an exact element-wise check run.
    """
    norms = foreach_norms(tensors)
    if bool(torch.stack(norms).isfinite().all()):
        return True
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> float:
    """The squared L2 norm of all tensors together (for ``pdasgd/grad_norm``), summed in double precision from one
    read of the per-tensor norms."""
    norms = foreach_norms(tensors)
    if not norms:
        return 0.0
    return math.fsum(norm * norm for norm in torch.stack(norms).tolist())


@contextmanager
def reparametrized(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run code on ``module`` with some parameters swapped for other tensors (tied weights stay tied).

    ``torch.func.functional_call`` only calls ``forward``; we need to run ``training_step``, so we use the
    context manager behind it: ``torch.nn.utils.stateless._reparametrize_module``.
    """
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(module, tensors, tie_weights=True, strict=False):
        yield


class ParameterSwap:
    """``reparametrized`` for one fixed set of tensors, the module walked once instead of per call.

    Every engine forward swaps the same leaves into the same places (tied weights included); torch's context manager
    finds those places again on every call, a walk over every module (about 20 us on a small MLP). The places are
    written in the modules' ``_parameters`` as torch's swap writes them. Before each swap every place is checked to
    still hold the parameter found there; if one does not (the module changed under the engine), it walks again.
    """

    def __init__(self, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        self._module = module
        self._tensors = tensors
        self._places: list[tuple[dict[str, Any], str, torch.Tensor, torch.Tensor]] | None = None

    def _find(self) -> list[tuple[dict[str, Any], str, torch.Tensor, torch.Tensor]] | None:
        """(a module's ``_parameters``, name there, parameter, its replacement) for every place of every parameter;
        ``None`` where a name is not a parameter (torch's own swap handles those)."""
        try:
            replacement = {id(self._module.get_parameter(name)): tensor for name, tensor in self._tensors.items()}
        except AttributeError:
            return None
        return [
            (owner._parameters, name, param, replacement[id(param)])
            for owner in self._module.modules()
            for name, param in owner._parameters.items()
            if param is not None and id(param) in replacement
        ]

    @contextmanager
    def applied(self) -> Iterator[None]:
        places = self._places
        if places is None or any(params.get(name) is not param for params, name, param, _ in places):
            places = self._places = self._find()
        if places is None:
            with reparametrized(self._module, self._tensors):
                yield
            return
        for params, name, _, tensor in places:
            params[name] = tensor
        try:
            yield
        finally:
            for params, name, param, _ in places:
                params[name] = param


def mark_optimizer_stepped(optimizer: Optimizer) -> None:
    """Tell torch's LR schedulers that this optimizer stepped, although its ``step()`` was never called.

    ``torch.optim.lr_scheduler.LRScheduler`` wraps ``optimizer.step`` to set ``optimizer._opt_called`` and warns
    ("Detected call of `lr_scheduler.step()` before `optimizer.step()`") when it is missing. PD-ASGD applies the
    updates through per-parameter optimizers instead, so we set the flag the wrapper would have set.
    """
    optimizer._opt_called = True  # type: ignore[attr-defined]


def default_store() -> object:
    """The key-value store of torch.distributed's default group (TCPStore, or what torchrun/SLURM set up).

    Ranks claim batches with atomic ``store.add``: the store every launcher already provides, no transport of ours.
    """
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()




# ----------------------------------------------------------------------------------------------- optimizer steps
_UNHOOKED_STEP_CLASSES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def unhooked_step(optimizer_class: type) -> Callable[[Optimizer], object] | None:
    """The body of ``step`` of torch's SGD, Adam or AdamW, without ``Optimizer``'s per-call wrappers; else None.

    ``Optimizer`` wraps every ``step`` in a profiler record and the global and per-instance step hooks
    (``profile_hook_step``), and these classes' ``step`` in a grad-mode decorator (``_use_grad_for_differentiable``),
    each through ``functools.wraps``: about 20-40 us per call on a 2-core CPU, paid once per bucket update. The body
    is the same code, so a call under ``torch.no_grad()`` computes bit for bit what ``optimizer.step()`` does
    (``differentiable=False``). Only the exact classes: a subclass may override ``step``.
    """
    if optimizer_class not in _UNHOOKED_STEP_CLASSES:
        return None
    step = optimizer_class.step
    if not hasattr(step, "__wrapped__"):
        return None
    while hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return step  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------------- dynamo's sessions
# ``torch.compiler._compile_session_context`` holds ``torch.compiler.is_compiling()`` True for the whole process while
# dynamo compiles a frame (``torch._dynamo.convert_frame`` enters it by attribute, so a wrapper placed here is what
# it enters). Absent in other torch versions: then nothing is wrapped.


def wrap_compile_sessions(gate: Callable[[], Any]) -> None:
    """Enter ``gate()`` around every compile session (idempotent)."""
    session = getattr(torch.compiler, "_compile_session_context", None)
    if session is None or getattr(session, "_pdasgd_gated", False):
        return

    @contextmanager
    def gated_session() -> Iterator[None]:
        with gate(), session():
            yield

    gated_session._pdasgd_gated = True  # type: ignore[attr-defined]
    torch.compiler._compile_session_context = gated_session
