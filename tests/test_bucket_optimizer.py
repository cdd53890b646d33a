"""A bucket's step is the user's optimizer's own step, bit for bit, for every implementation the user can choose.

torch's SGD is stepped through its functional form (``torch.optim.sgd.sgd``, fused SGD excepted), Adam and AdamW
through the body of torch's ``step`` without ``Optimizer``'s per-call wrappers (``_torch_internals.unhooked_step``);
every other optimizer through ``optimizer.step()``. Either way the parameters
and the optimizer state must equal a plain ``optimizer.step()`` on the same gradients exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.engine.bucket_optimizer import BucketOptimizer, hyperparameter_snapshot
from lightning_pdasgd.engine.parameter_buckets import make_buckets

OPTIONS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd momentum nesterov wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd dampening maximize": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3, maximize=True),
    "sgd foreach=False": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False),
    "sgd fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam amsgrad wd": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adam foreach=False maximize": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False, maximize=True),
    "adam fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "adamw amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "adamw fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "rmsprop (optimizer.step)": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "adagrad (optimizer.step)": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_bucket_step_equals_the_users_optimizer_step_bitwise(name: str) -> None:
    plain_model, model = _model(), _model()
    plain = OPTIONS[name](plain_model.parameters())
    user = OPTIONS[name](model.parameters())
    buckets = make_buckets(model, user, 0)  # one bucket per module
    steppers = [BucketOptimizer(user, bucket) for bucket in buckets]
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = {name: torch.randn(p.shape, generator=generator) for name, p in plain_model.named_parameters()}
        for param_name, param in plain_model.named_parameters():
            param.grad = grads[param_name].clone()
        plain.step()
        hyperparameters = hyperparameter_snapshot(user)
        for bucket, stepper in zip(buckets, steppers):
            bucket_grads = [grads[n].clone() for n in bucket.names]

            def step(staleness: int, version: int, targets: list[torch.Tensor], stepper: Any = stepper,
                     bucket_grads: list[torch.Tensor] = bucket_grads, group: int = bucket.group_index) -> None:
                stepper.step(bucket_grads, hyperparameters[group], targets)

            bucket.update(bucket.version, step)
    for (key, expected), actual in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(expected, actual), key
    plain_state, state = plain.state_dict()["state"], user.state_dict()["state"]
    assert plain_state.keys() == state.keys()
    for index, entries in plain_state.items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[index][key])), (name, index, key)


def test_only_torchs_own_sgd_adam_and_adamw_skip_the_step_wrappers() -> None:
    class CustomSGD(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # a subclass may do more in its step: never bypassed
            return super().step(closure)

    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        assert _torch_internals.unhooked_step(cls) is not None, cls
    for cls in (CustomSGD, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.LBFGS):
        assert _torch_internals.unhooked_step(cls) is None, cls


@pytest.mark.parametrize(
    ("make", "exact"),
    [
        (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3), True),
        (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.2, maximize=True), True),
        (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True), False),
        (lambda params: torch.optim.SGD(params, lr=0.1), False),
        (lambda params: torch.optim.Adam(params, lr=0.1), False),
    ],
    ids=["heavy-ball", "heavy-ball-maximize", "nesterov", "no-momentum", "adam"],
)
def test_a_heavy_ball_step_is_exactly_lr_times_its_momentum_buffer(make: Any, exact: bool) -> None:
    """``heavy_ball_velocity``: only where ``-lr * momentum_buffer`` is the step the bucket just took (what weight
    prediction extrapolates instead of keeping a copy of the weights); ``None`` for every other optimizer."""
    module = torch.nn.Linear(5, 3)
    optimizer = make(module.parameters())
    bucket = make_buckets(module, optimizer, 0)[0]
    stepper = BucketOptimizer(optimizer, bucket)
    hyperparameters = hyperparameter_snapshot(optimizer)[0]
    assert stepper.heavy_ball_velocity(hyperparameters) is None, "no buffer before the first step"
    for _ in range(2):
        before = [tensor.clone() for tensor in bucket.aliases]
        stepper.step([torch.randn(p.shape) for p in bucket.params], hyperparameters, bucket.aliases)
    velocity = stepper.heavy_ball_velocity(hyperparameters)
    assert (velocity is not None) is exact
    if velocity is not None:
        buffers, factor = velocity
        for after, earlier, buffer in zip(bucket.aliases, before, buffers):
            torch.testing.assert_close(after - earlier, factor * buffer, rtol=1e-5, atol=1e-7)


# torch's fused SGD is left out: where the first of its parameters has a momentum buffer and a later one has none yet,
# its step fails (and where the first has none, it starts every buffer afresh); see the test after this one
PARTIAL_GRADIENT_OPTIONS = [name for name in sorted(OPTIONS) if not name.startswith(("rmsprop", "adagrad", "sgd fused"))]


@pytest.mark.parametrize("name", PARTIAL_GRADIENT_OPTIONS)
def test_a_parameter_without_a_gradient_is_left_alone_as_by_the_users_step(name: str) -> None:
    """A bucket step where one parameter has no gradient (unused in that backward, or skipped as non-finite) moves the
    others exactly as ``optimizer.step()`` does with that parameter's ``.grad`` unset, and creates no state for it."""
    plain_model, model = _model(), _model()
    plain = OPTIONS[name](plain_model.parameters())
    user = OPTIONS[name](model.parameters())
    bucket = make_buckets(model, user, 10**6)[0]  # every parameter in one bucket
    stepper = BucketOptimizer(user, bucket)
    generator = torch.Generator().manual_seed(2)
    names = dict(plain_model.named_parameters())
    for round_ in range(3):
        left_out = bucket.names[round_ % len(bucket.names)] if round_ < 2 else bucket.names[0]
        grads = {n: torch.randn(names[n].shape, generator=generator) for n in bucket.names}
        for param_name, param in names.items():
            param.grad = None if param_name == left_out else grads[param_name].clone()
        plain.step()
        bucket_grads = [None if n == left_out else grads[n].clone() for n in bucket.names]
        hyperparameters = hyperparameter_snapshot(user)[0]
        bucket.update(bucket.version, lambda staleness, version, targets: stepper.step(bucket_grads, hyperparameters,
                                                                                      targets))
    for (key, expected), actual in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(expected, actual), key
    plain_state, state = plain.state_dict()["state"], user.state_dict()["state"]
    assert plain_state.keys() == state.keys(), name
    for index, entries in plain_state.items():
        assert entries.keys() == state[index].keys(), (name, index)
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[index][key])), (name, index, key)


def test_fused_sgd_with_partial_gradients_moves_each_parameter_as_the_multi_tensor_step_does() -> None:
    """torch's fused SGD fails on a step where some parameters have a momentum buffer and a later one has none yet (a
    parameter that got no gradient before: a layer used only sometimes). A bucket steps the two kinds apart, so each
    parameter moves as torch's multi-tensor SGD moves it."""
    fused_model, foreach_model = _model(), _model()
    fused = torch.optim.SGD(fused_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, fused=True)
    foreach = torch.optim.SGD(foreach_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True)
    steppers = []
    for model, optimizer in ((fused_model, fused), (foreach_model, foreach)):
        bucket = make_buckets(model, optimizer, 10**6)[0]
        steppers.append((bucket, BucketOptimizer(optimizer, bucket), optimizer))
    generator = torch.Generator().manual_seed(3)
    names = steppers[0][0].names
    for left_out in (names[-1], None, names[0], None):  # the last parameter joins late, the first leaves once
        grads = {n: torch.randn(p.shape, generator=generator) for n, p in fused_model.named_parameters()}
        for bucket, stepper, optimizer in steppers:
            bucket_grads = [None if n == left_out else grads[n].clone() for n in bucket.names]
            hyperparameters = hyperparameter_snapshot(optimizer)[0]
            bucket.update(bucket.version, lambda staleness, version, targets, stepper=stepper, g=bucket_grads,
                          h=hyperparameters: stepper.step(g, h, targets))
    for (key, expected), actual in zip(foreach_model.state_dict().items(), fused_model.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=key)
