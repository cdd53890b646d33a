"""One instance of the user's optimizer class per bucket, whose state lives in the user's optimizer.

Why: PD-ASGD applies each bucket's update the moment its gradients are ready, while other backward passes update
other buckets; ``optimizer.step()`` on the user's optimizer would touch every parameter and is not safe from
several threads. An instance of the same class with the same hyperparameters and implementation flags (foreach,
fused) reproduces a whole-model step exactly for element-wise optimizers (SGD, Adam, AdamW, RMSprop, ...), and
keeping its state in the user's optimizer keeps checkpoints in Lightning's standard format.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as functional_sgd  # public: what `SGD.step` calls

from lightning_pdasgd.engine import _torch_internals, compile_gate
from lightning_pdasgd.engine.compile_gate import GATE
from lightning_pdasgd.engine.parameter_buckets import ParameterBucket


def hyperparameter_snapshot(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The hyperparameters in force now, one dict per param group (what a plain ``optimizer.step()`` would use)."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def optimizer_for(optimizer: Optimizer, group: dict[str, Any], tensors: list[Tensor]) -> Optimizer:
    """Build an instance of the user's optimizer class for ``tensors``, from their param group.

    Only keys the constructor names are passed: groups carry extras (``initial_lr`` from schedulers,
    ``decoupled_weight_decay`` in AdamW) that constructors reject. Every key is copied again before each step.
    """
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {key: value for key, value in group.items() if key != "params" and key in accepted}
    try:
        return cls(tensors, **kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised with the fix named
        raise TypeError(
            f"PD-ASGD builds one `{cls.__name__}` per bucket of parameters from their param group ({sorted(kwargs)})"
            f" and could not: {error}. Use an element-wise torch.optim optimizer (SGD, Adam, AdamW, RMSprop, ...)"
            " whose constructor accepts its param group's hyperparameters."
        ) from error


@functools.lru_cache(maxsize=None)
def closure_arguments(cls: type) -> tuple[tuple[Any, ...], tuple[tuple[str, Any], ...]]:
    """The arguments for ``cls.step`` without a closure: none, or ``None`` where ``step`` requires a closure.

    Plain Lightning always passes its closure (``optimizer.step(closure=...)``), so third-party optimizers may
    declare ``def step(self, closure)`` without a default (Hugging Face's old ``AdamW``). A bucket's step has no
    loss to re-evaluate (its backward already ran), so it passes ``None`` there, which every such step accepts.
    Returns the positional arguments and the keyword arguments (as pairs: the result is cached per class).
    """
    try:
        parameters = list(inspect.signature(cls.step).parameters.values())[1:]  # without `self`
    except (TypeError, ValueError):  # no introspectable signature: call it as torch's own optimizers
        return (), ()
    for parameter in parameters:
        if parameter.default is not inspect.Parameter.empty or parameter.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            return (), ((parameter.name, None),)
        return (None,), ()
    return (), ()


def multi_tensor_flags(optimizer: Optimizer, group: dict[str, Any]) -> dict[str, Any]:
    """``foreach=True`` where the user left the implementation to torch (``foreach=None``, not fused).

    A bucket is then stepped by torch's multi-tensor kernels in one call, as a plain ``optimizer.step()`` does on
    CUDA; on CPU torch would pick its per-tensor loop, whose results are bitwise the same (SGD, Adam, AdamW
    measured) but which costs a Python iteration per parameter. An explicit ``foreach``/``fused`` is kept.
    """
    defaults = optimizer.defaults
    if "foreach" not in defaults or group.get("foreach") is not None or group.get("fused"):
        return {}
    if group.get("differentiable"):  # torch's multi-tensor path does not support differentiable steps
        return {}
    return {"foreach": True}


_SGD_ARGUMENTS = frozenset(("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"))


class BucketOptimizer:
    """Steps one bucket with the user's optimizer class, reading and writing the user's optimizer state."""

    def __init__(self, user_optimizer: Optimizer, bucket: ParameterBucket) -> None:
        self._user = user_optimizer
        self._bucket = bucket
        group = user_optimizer.param_groups[bucket.group_index]
        self._optimizer = optimizer_for(user_optimizer, group, bucket.aliases)
        self._implementation = multi_tensor_flags(self._optimizer, group)
        self._unhooked_step = _torch_internals.unhooked_step(type(self._optimizer))  # SGD, Adam, AdamW
        self._is_sgd = type(self._optimizer) is torch.optim.SGD  # torch's own, not a subclass
        self._stepped_states: list[dict[str, Any]] = []  # the state of each parameter at the last step
        compile_gate.install()

    @property
    def supports_found_inf(self) -> bool:
        """Whether the optimizer can skip a step on the device (torch's fused SGD/Adam/AdamW/Adagrad: the
        ``found_inf`` tensor GradScaler passes them), so a non-finite bucket moves nothing, state included."""
        return bool(getattr(self._optimizer, "_step_supports_amp_scaling", False))

    def set_found_inf(self, found_inf: Tensor) -> None:
        """The next step is skipped on the device where ``found_inf`` is 1 (float32, on the parameters' device)."""
        self._optimizer.found_inf = found_inf  # type: ignore[attr-defined]  # read by torch's fused step

    def heavy_ball_velocity(self, hyperparameters: dict[str, Any]) -> tuple[list[Tensor], float] | None:
        """After a step that updated every parameter of the bucket: torch's SGD with heavy-ball momentum moved each
        by exactly ``-lr * momentum_buffer`` (weight decay, dampening and ``maximize`` are inside the buffer), so
        the buffers and ``-lr`` describe the update without a copy of the weights. ``None`` for any other
        optimizer, Nesterov momentum (its update also holds the gradient) or a tensor ``lr``."""
        if not self._is_sgd or hyperparameters.get("nesterov"):
            return None
        lr, momentum = hyperparameters.get("lr"), hyperparameters.get("momentum")
        if not isinstance(lr, (int, float)) or not isinstance(momentum, (int, float)) or momentum <= 0:
            return None
        if len(self._stepped_states) != len(self._bucket.params):  # no step yet
            return None
        buffers = []
        for state in self._stepped_states:  # the last step's, in the bucket's order (no tensor hashed again)
            buffer = state.get("momentum_buffer")
            if buffer is None:
                return None
            buffers.append(buffer)
        return buffers, -float(lr)

    def step(self, grads: list[Tensor | None], hyperparameters: dict[str, Any], targets: list[Tensor]) -> None:
        """One update of the bucket's values in ``targets`` from ``grads`` (``None``: that parameter is left as
        it is). ``targets`` are the storage the bucket chose to write (``ParameterBucket.update``: the live values
        or, copy-on-write, a buffer that becomes live).

        The state is re-linked on every step because ``Optimizer.load_state_dict`` replaces the user's state
        objects; an optimizer that keeps no state leaves no entry, as its whole-model step would. torch's SGD goes
        through its functional form (``_sgd_step``); fused SGD, Adam and AdamW through the body of their ``step``.
        Never while torch.compile compiles on another thread (``compile_gate.py``).
        """
        GATE.step_started()
        try:
            self._step(grads, hyperparameters, targets)
        finally:
            GATE.step_ended()

    def _step(self, grads: list[Tensor | None], hyperparameters: dict[str, Any], targets: list[Tensor]) -> None:
        if self._is_sgd and not hyperparameters.get("fused") and not hyperparameters.get("differentiable"):
            self._sgd_step(grads, hyperparameters, targets)
            return
        parts = self._fused_sgd_parts(grads, hyperparameters)
        if parts is not None:
            for part in parts:
                self._step(part, hyperparameters, targets)
            return
        optimizer = self._optimizer
        group = optimizer.param_groups[0]
        group.update(hyperparameters)
        group.update(self._implementation)
        group["params"] = targets
        user_state = self._user.state
        own_state = optimizer.state
        own_state.clear()
        linked = []
        stepped_states = []
        for param, target, grad in zip(self._bucket.params, targets, grads):
            state = user_state.get(param)
            if state is None:
                state = {}
                linked.append((param, state))
            own_state[target] = state
            stepped_states.append(state)
            target.grad = grad
        self._stepped_states = stepped_states
        try:
            if self._unhooked_step is not None and not group.get("differentiable"):
                if torch.is_grad_enabled():  # in the gradient hook autograd has turned it off already
                    with torch.no_grad():
                        self._unhooked_step(optimizer)
                else:
                    self._unhooked_step(optimizer)
            else:
                args, kwargs = closure_arguments(type(optimizer))
                optimizer.step(*args, **dict(kwargs))
        finally:
            for target in targets:
                target.grad = None
        for param, state in linked:
            if state:
                user_state[param] = state

    def _fused_sgd_parts(
        self, grads: list[Tensor | None], hyperparameters: dict[str, Any]
    ) -> tuple[list[Tensor | None], list[Tensor | None]] | None:
        """Fused SGD with momentum, where some stepped parameters have a momentum buffer and others none yet (a
        parameter that got no gradient before): torch's fused step tells its first step from the first parameter's
        buffer alone, and fails on such a mix (or, where the first has none, starts every buffer afresh). Stepped
        in two parts, those without a buffer and those with one, each parameter moves as it would alone; ``None``
        where no split is needed."""
        if not (self._is_sgd and hyperparameters.get("fused") and hyperparameters.get("momentum")):
            return None
        user_state = self._user.state
        fresh = [
            grad is not None and (user_state.get(param) or {}).get("momentum_buffer") is None
            for param, grad in zip(self._bucket.params, grads)
        ]
        with_buffer = [grad is not None and not first for grad, first in zip(grads, fresh)]
        if not any(fresh) or not any(with_buffer):
            return None
        return ([grad if first else None for grad, first in zip(grads, fresh)],
                [grad if has else None for grad, has in zip(grads, with_buffer)])

    def _sgd_step(self, grads: list[Tensor | None], hyperparameters: dict[str, Any], targets: list[Tensor]) -> None:
        """torch's SGD through its functional form, ``torch.optim.sgd.sgd``: the call ``SGD.step`` makes, with the
        same arguments (so bit for bit the same), without the param group, ``.grad`` and state plumbing around it."""
        if not _SGD_ARGUMENTS <= hyperparameters.keys():  # a param group edited by hand: the constructor's defaults
            hyperparameters = {**self._optimizer.defaults, **hyperparameters}
        momentum = hyperparameters["momentum"]
        user_state = self._user.state
        params, used, buffers, states, stepped_states = [], [], [], [], []
        for param, target, grad in zip(self._bucket.params, targets, grads):
            state = user_state.get(param)
            if state is None:
                state = {}
                if momentum != 0 and grad is not None:  # as `SGD.step`: momentum keeps a state per parameter
                    user_state[param] = state
            stepped_states.append(state)
            if grad is None:
                continue
            params.append(target)
            used.append(grad)
            if momentum != 0:
                states.append(state)
                buffers.append(state.get("momentum_buffer"))
        self._stepped_states = stepped_states
        optimizer = self._optimizer
        step = functools.partial(
            functional_sgd, params, used, buffers, weight_decay=hyperparameters["weight_decay"], momentum=momentum,
            lr=hyperparameters["lr"], dampening=hyperparameters["dampening"], nesterov=hyperparameters["nesterov"],
            maximize=hyperparameters["maximize"], has_sparse_grad=any(grad.is_sparse for grad in used),
            foreach=self._implementation.get("foreach", hyperparameters.get("foreach")), fused=False,
            grad_scale=getattr(optimizer, "grad_scale", None), found_inf=getattr(optimizer, "found_inf", None),
        )
        if torch.is_grad_enabled():  # in the gradient hook autograd has turned it off already (no context per call)
            with torch.no_grad():
                step()
        else:
            step()
        for state, buffer in zip(states, buffers):
            state["momentum_buffer"] = buffer
