"""The layer-wise updater driven by hand (no Trainer, no backward threads): one forward, backward and update at a
time, exactly as a backward thread runs them (``engine/session.py``: ``forward`` then ``_run_backward``).

With one step in flight every update has staleness 0, so the result must be bitwise that of a plain
``loss.backward(); optimizer.step(); optimizer.zero_grad()`` loop, with the optimizer state in the user's
optimizer. (On CPU the per-bucket optimizers run torch's foreach kernels where a plain step runs its per-tensor
loop; ``bucket_optimizer.py`` states these are bitwise equal for SGD, Adam and AdamW.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.engine.bucket_optimizer import hyperparameter_snapshot
from lightning_pdasgd.engine.compensation import StalenessCompensation, resolve
from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
from lightning_pdasgd.engine.weight_stash import UNREAD, WeightStash

STEPS = 5
MakeOptimizer = Callable[[Any], torch.optim.Optimizer]

OPTIMIZERS: dict[str, MakeOptimizer] = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """The tensors are tiny: a second intra-op (OpenMP) thread only adds spin-waits, which made this file take
    seconds instead of a fraction of one on a busy 2-core machine. Both sides of every comparison run alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(steps: int = STEPS, scale: float = 1.0) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (scale * torch.randn(12, 8, generator=generator), torch.randint(0, 3, (12,), generator=generator))
        for _ in range(steps)
    ]


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _updater_step(updater: LayerwiseUpdater, model: nn.Module, optimizer: torch.optim.Optimizer,
                  batch: tuple[Tensor, Tensor], loss_fn: Callable[..., Tensor] = _loss) -> WeightStash:
    """One PD-ASGD step as the session runs it: forward on a stash, hand-off, backward (whose hooks step the
    buckets), ``finish`` and ``release``. Returns the stash (its record stays readable)."""
    stash = updater.stash()
    with _torch_internals.reparametrized(model, stash.tensors), updater.reading(stash):
        loss = loss_fn(model, *batch)
    assert UNREAD not in stash.versions
    stash.hyperparameters = hyperparameter_snapshot(optimizer)  # the session's hand-off does this
    torch.autograd.backward(loss, inputs=stash.leaves)
    del loss  # the graph is gone before the leaves are reused
    updater.finish(stash)
    updater.release(stash, reusable=True)
    return stash


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor],
                clip: Callable[[list[nn.Parameter]], None] | None = None,
                loss_fn: Callable[..., Tensor] = _loss) -> None:
    loss_fn(model, *batch).backward()
    if clip is not None:
        clip(list(model.parameters()))
    optimizer.step()
    optimizer.zero_grad()


def _train_both(make_optimizer: MakeOptimizer, clip: Callable[[list[nn.Parameter]], None] | None = None,
                batches: list[tuple[Tensor, Tensor]] | None = None, **updater_kwargs: Any) -> tuple[Any, ...]:
    """The same model trained by the updater and by plain steps; returns both models and optimizers."""
    model = _net()
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters())
    reference_optimizer = make_optimizer(reference.parameters())
    updater = LayerwiseUpdater(model, optimizer, **updater_kwargs)
    try:
        for batch in batches or _batches():
            _updater_step(updater, model, optimizer, batch)
            _plain_step(reference, reference_optimizer, batch, clip)
    finally:
        updater.close()
    return model, optimizer, reference, reference_optimizer, updater


def _assert_bitwise_equal(model: nn.Module, reference: nn.Module) -> None:
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(got.detach(), want.detach()), f"{name} differs from the plain step"


# ----------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("bucket_numel", [0, 10**9], ids=["bucket-per-layer", "one-bucket"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_sequential_updates_are_bitwise_a_plain_optimizer_step(optimizer_name: str, bucket_numel: int) -> None:
    """N sequential forward/backward/update steps give bitwise the weights of N plain steps, whether each layer is
    its own bucket or the whole model is one."""
    model, _, reference, _, updater = _train_both(OPTIMIZERS[optimizer_name], bucket_numel=bucket_numel)
    assert len(updater.buckets) == (3 if bucket_numel == 0 else 1)
    assert updater.versions == [STEPS] * len(updater.buckets)
    _assert_bitwise_equal(model, reference)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_the_user_optimizer_holds_the_state_of_every_parameter(optimizer_name: str) -> None:
    """The per-bucket optimizers keep their state (momentum buffers, Adam's moments and step) in the user's
    optimizer, keyed by the user's parameters: its ``state_dict()`` equals that of the plain run, tensor for
    tensor (so checkpoints keep the standard format and resume exactly)."""
    model, optimizer, _, reference_optimizer, _ = _train_both(OPTIMIZERS[optimizer_name])
    params = list(model.parameters())
    assert set(optimizer.state) == set(params)  # keyed by the parameters themselves, not by internal buffers
    got, want = optimizer.state_dict(), reference_optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"]) == list(range(len(params)))
    for index, state in want["state"].items():
        assert sorted(got["state"][index]) == sorted(state)
        for key, value in state.items():
            mine = got["state"][index][key]
            assert torch.equal(mine, value) if isinstance(value, Tensor) else mine == value, (index, key)


def test_an_optimizer_without_state_leaves_the_user_state_empty() -> None:
    """An optimizer that keeps no state (SGD without momentum) leaves the user's state empty, as a plain step does
    (no empty per-parameter entries are added by the per-bucket optimizers)."""
    model, optimizer, reference, reference_optimizer, _ = _train_both(lambda p: torch.optim.SGD(p, lr=0.1))
    _assert_bitwise_equal(model, reference)
    assert reference_optimizer.state_dict()["state"] == {}
    assert optimizer.state_dict()["state"] == {} and len(optimizer.state) == 0


# ----------------------------------------------------------------------------------------------- layer-wise
class _Probe(torch.autograd.Function):
    """Identity whose backward calls ``on_backward`` (when the gradient reaches this point of the network)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, on_backward: Callable[[], None]) -> Tensor:  # type: ignore[override]
        ctx.on_backward = on_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        ctx.on_backward()
        return grad, None


def test_a_bucket_is_updated_as_soon_as_its_gradients_are_ready() -> None:
    """Layer-wise: when the backward pass reaches the first layer, the buckets of the layers after it have
    already been updated, and the first layer's bucket has not."""
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = LayerwiseUpdater(model, optimizer, bucket_numel=0)
    seen: list[list[int]] = []

    def loss_fn(net: nn.Sequential, x: Tensor, y: Tensor) -> Tensor:
        h = _Probe.apply(net[0](x), lambda: seen.append(updater.versions))
        return nn.functional.cross_entropy(net[2:](net[1](h)), y)

    try:
        _updater_step(updater, model, optimizer, _batches(1)[0], loss_fn)
    finally:
        updater.close()
    assert [bucket.names for bucket in updater.buckets] == [["4.bias", "4.weight"], ["2.bias", "2.weight"],
                                                           ["0.bias", "0.weight"]]
    assert seen == [[1, 1, 0]]
    assert updater.versions == [1, 1, 1]


def test_whole_backward_updates_are_bitwise_a_plain_step_too() -> None:
    """``layerwise=False`` (the D-ASGD ablation): every bucket is stepped at the backward's end, with the same
    result as a plain step."""
    model, _, reference, _, updater = _train_both(OPTIMIZERS["sgd-momentum"], layerwise=False)
    assert not updater.layerwise
    _assert_bitwise_equal(model, reference)


# ----------------------------------------------------------------------------------------------- clipping
CLIP = 0.01


def test_clip_value_is_bitwise_a_plain_step_after_clip_grad_value() -> None:
    """``clip_value`` clamps every gradient to ``[-c, c]`` before its bucket's step, as Lightning's
    ``gradient_clip_algorithm="value"`` (``clip_grad_value_``) does before a plain step."""
    batches = _batches(scale=10.0)
    model, _, reference, _, _ = _train_both(
        OPTIMIZERS["sgd-momentum"], clip=lambda params: torch.nn.utils.clip_grad_value_(params, CLIP),
        batches=batches, clip_value=CLIP,
    )
    _assert_bitwise_equal(model, reference)
    unclipped = _train_both(OPTIMIZERS["sgd-momentum"], batches=batches)[0]
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), unclipped.parameters()))  # it did clip


def test_clip_value_bounds_each_element_of_an_update() -> None:
    """With plain SGD at ``lr=1`` an update is minus the gradient: no element moves by more than ``c``, and large
    gradients move by exactly ``c``."""
    model = _net()
    before = [param.detach().clone() for param in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    updater = LayerwiseUpdater(model, optimizer, clip_value=CLIP)
    try:
        _updater_step(updater, model, optimizer, _batches(1, scale=100.0)[0],
                      lambda net, x, y: 1000.0 * _loss(net, x, y))
    finally:
        updater.close()
    moves = torch.cat([(param.detach() - old).abs().flatten() for param, old in zip(model.parameters(), before)])
    assert float(moves.max()) <= CLIP * (1 + 1e-6)
    assert float(moves.max()) >= CLIP * (1 - 1e-3)  # some gradients were larger than c and got clamped


def test_clip_norm_is_a_plain_step_after_clip_grad_norm() -> None:
    """``clip_norm`` scales one backward's gradients by ``min(1, c / (norm + 1e-6))`` as ``clip_grad_norm_`` does;
    at one loss in flight (the updater's default without a session) it applies a backward's buckets together at its
    end. Bitwise equal to ``clip_grad_norm_``
    over the gradients in the updater's bucket order; over the module's order (what Lightning passes) the total
    norm is summed in another order, so equal up to its last bit."""
    max_norm = 0.05

    def in_bucket_order(params: list[nn.Parameter]) -> list[nn.Parameter]:
        return params[::-1]  # last layer first, bias before weight (checked below)

    model, _, reference, _, updater = _train_both(
        OPTIMIZERS["adam"], clip=lambda params: torch.nn.utils.clip_grad_norm_(in_bucket_order(params), max_norm),
        clip_norm=max_norm,
    )
    names = [name for name, _ in model.named_parameters()]
    assert [name for bucket in updater.buckets for name in bucket.names] == in_bucket_order(names)
    _assert_bitwise_equal(model, reference)

    lightning_order = _train_both(
        OPTIMIZERS["adam"], clip=lambda params: torch.nn.utils.clip_grad_norm_(params, max_norm)
    )[2]
    unclipped = _train_both(OPTIMIZERS["adam"])[0]
    for got, want, free in zip(model.parameters(), lightning_order.parameters(), unclipped.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
        assert not torch.equal(got, free)  # the norm bound was reached: clipping changed every parameter


# ----------------------------------------------------------------------------------------------- non-finite
class _PoisonGradient(torch.autograd.Function):
    """Identity whose backward turns the gradient into NaN (only the layers before it get non-finite grads)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad * float("nan")


def _poisoned_first_layer(net: nn.Sequential, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(net[1:](_PoisonGradient.apply(net[0](x))), y)


def test_nonfinite_skip_leaves_the_bad_bucket_unchanged_and_updates_the_others() -> None:
    """``nonfinite="skip"``: a bucket whose gradients are NaN keeps its values and counts its parameters in the
    record; the other buckets get the plain step's update."""
    model = _net()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    first_layer = [param.detach().clone() for param in model[0].parameters()]
    updater = LayerwiseUpdater(model, optimizer, nonfinite="skip", bucket_numel=0)
    try:
        stash = _updater_step(updater, model, optimizer, _batches(1)[0], _poisoned_first_layer)
    finally:
        updater.close()
    assert stash.record.skipped == 2  # 0.weight and 0.bias
    assert all(torch.equal(param.detach(), old) for param, old in zip(model[0].parameters(), first_layer))
    _plain_step(reference, reference_optimizer, _batches(1)[0])
    for layer in (2, 4):
        for got, want in zip(model[layer].parameters(), reference[layer].parameters()):
            assert torch.equal(got.detach(), want.detach())


def test_nonfinite_error_raises_naming_the_parameter_and_applies_nothing_to_it() -> None:
    """``nonfinite="error"`` (the default): a NaN gradient raises a ``FloatingPointError`` (``NonFiniteError``)
    naming the parameter, and that parameter is not updated."""
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first_layer = [param.detach().clone() for param in model[0].parameters()]
    updater = LayerwiseUpdater(model, optimizer, bucket_numel=0)
    try:
        with pytest.raises(FloatingPointError, match=r"non-finite gradient for parameter '0\.(weight|bias)'"):
            _updater_step(updater, model, optimizer, _batches(1)[0], _poisoned_first_layer)
    finally:
        updater.close()
    assert all(torch.equal(param.detach(), old) for param, old in zip(model[0].parameters(), first_layer))


class _RecordsWhatWasRead(StalenessCompensation):
    """A user's compensation that overrides ``before_step``: it must get the weights each update's forward read."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[list[Tensor], list[Tensor]]] = []

    def before_step(self, key: Any, params: Any, grads: Any, read: Any, staleness: int, version: int,
                    hyperparameters: dict[str, Any]) -> None:
        self.seen.append(([p.detach().clone() for p in params], [r.detach().clone() for r in read]))


def test_a_compensation_that_reads_what_the_forward_read_gets_it_and_the_builtins_that_do_not_get_none() -> None:
    recorder = _RecordsWhatWasRead()
    assert recorder.uses_read and resolve("dc").uses_read
    assert not any(resolve(name).uses_read for name in ("none", "predict", "momentum", "lr"))
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = LayerwiseUpdater(model, optimizer, compensation=recorder)
    try:
        for batch in _batches(2):
            _updater_step(updater, model, optimizer, batch)
    finally:
        updater.close()
    assert len(recorder.seen) == 2 * len(updater.buckets)
    for params, read in recorder.seen:  # one loss at a time: the live weights are what was read
        assert len(read) == len(params) > 0
        assert all(torch.equal(p, r) for p, r in zip(params, read))
