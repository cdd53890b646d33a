"""Clipping by norm under asynchrony: each bucket is clipped when it is stepped, by the total known then.

The model's loss is linear in every weight, so each layer's gradient is the same at every step whatever the
weights: from the second backward on, the estimate of the buckets still to come is exact, and the updates must be
those of ``clip_grad_norm_`` over the whole backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.engine.bucket_optimizer import hyperparameter_snapshot
from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
from lightning_pdasgd.engine.norm_clipping import BucketwiseNormClip, ClipProgress, squared_norm

MAX_NORM = 0.5


class Branches(nn.Module):
    """Three bias-free layers on three inputs, each output weighted by a fixed vector: a loss linear in the weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 3, bias=False), nn.Linear(5, 2, bias=False),
                                     nn.Linear(6, 4, bias=False)])
        generator = torch.Generator().manual_seed(1)
        self.inputs = [torch.randn(2, layer.in_features, generator=generator) for layer in self.layers]
        self.weights = [torch.randn(2, layer.out_features, generator=generator)
                        for layer in self.layers]

    def forward(self) -> Tensor:
        return sum(((layer(x) * w).sum() for layer, x, w in zip(self.layers, self.inputs, self.weights)),
                   torch.zeros(()))


def _asynchronous_step(updater: LayerwiseUpdater, model: Branches, optimizer: torch.optim.Optimizer) -> list[int]:
    """One step as a backward thread runs it; returns the bucket versions seen before ``finish``."""
    stash = updater.stash()
    with _torch_internals.reparametrized(model, stash.tensors), updater.reading(stash):
        loss = model()
    stash.hyperparameters = hyperparameter_snapshot(optimizer)
    torch.autograd.backward(loss, inputs=stash.leaves)
    del loss
    versions = updater.versions
    updater.finish(stash)
    updater.release(stash, reusable=True)
    return versions


def _coefficients(before: list[Tensor], after: list[Tensor], grads: list[Tensor], lr: float) -> list[float]:
    """Per layer, the factor its gradient was scaled by (one SGD step without momentum)."""
    return [float(((old - new) / (lr * grad)).mean()) for old, new, grad in zip(before, after, grads)]


def test_each_bucket_is_clipped_when_it_is_stepped_by_the_total_known_then() -> None:
    lr = 0.1
    model = Branches()
    reference = copy.deepcopy(model)
    reference().backward()
    grads = [layer.weight.grad.clone() for layer in reference.layers]
    total = float(torch.sqrt(sum((g * g).sum() for g in grads)))
    exact = MAX_NORM / (total + 1e-6)
    assert exact < 0.5  # every bucket alone is above the bound too: clipping shows on each

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    updater = LayerwiseUpdater(model, optimizer, clip_norm=MAX_NORM, bucket_numel=0, one_loss_in_flight=lambda: False)
    try:
        assert len(updater.buckets) == 3
        weights = [layer.weight.detach().clone() for layer in model.layers]
        versions = _asynchronous_step(updater, model, optimizer)
        assert versions == [1, 1, 1]  # every bucket stepped during the backward, before its end
        first = _coefficients(weights, [layer.weight.detach() for layer in model.layers], grads, lr)
        # no history yet: each bucket sees the norm of those stepped before it and its own; the last one the total
        assert min(first) == pytest.approx(exact, rel=1e-5)
        assert all(coefficient >= exact * (1 - 1e-5) for coefficient in first)
        assert all(coefficient * float(grad.norm()) <= MAX_NORM * (1 + 1e-5) for coefficient, grad in zip(first, grads))
        assert max(first) > exact * 1.1  # the first bucket stepped knew only its own norm

        for _ in range(3):  # the gradients are the same at every step: now each bucket knows the exact total
            weights = [layer.weight.detach().clone() for layer in model.layers]
            _asynchronous_step(updater, model, optimizer)
            later = _coefficients(weights, [layer.weight.detach() for layer in model.layers], grads, lr)
            assert later == pytest.approx([exact] * 3, rel=1e-5)
    finally:
        updater.close()


def test_at_one_loss_in_flight_the_backward_is_clipped_together_at_its_end() -> None:
    model = Branches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = LayerwiseUpdater(model, optimizer, clip_norm=MAX_NORM, bucket_numel=0, one_loss_in_flight=lambda: True)
    reference = copy.deepcopy(model)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    try:
        for _ in range(3):
            before = updater.versions
            assert _asynchronous_step(updater, model, optimizer) == before  # nothing stepped before the end
            reference().backward()
            torch.nn.utils.clip_grad_norm_(list(reference.parameters()), MAX_NORM)
            reference_optimizer.step()
            reference_optimizer.zero_grad()
    finally:
        updater.close()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_the_device_form_clips_as_the_host_form(device: str) -> None:
    """The CUDA form (squares as device scalars, nothing read on the host) scales as the host form does, backward
    after backward, also after a backward in which one bucket got no gradient (``forget``)."""
    generator = torch.Generator().manual_seed(2)
    on_host, on_device = BucketwiseNormClip(MAX_NORM, 3), BucketwiseNormClip(MAX_NORM, 3)
    for number in range(4):
        host_progress, device_progress = ClipProgress(together=False), ClipProgress(together=False)
        for index in range(3):
            grads = [torch.randn(5, generator=generator) * (index + 1)]
            if number == 2 and index == 2:
                on_host.forget(index)  # this backward gave bucket 2 no gradient
                on_device.forget(index)
                continue
            host, on_gpu = [grad.clone() for grad in grads], [grad.to(device, copy=True) for grad in grads]
            on_host.clip_(host_progress, index, host, _torch_internals.sum_of_squares(host))
            on_device.clip_(device_progress, index, on_gpu, squared_norm(on_gpu))
            torch.testing.assert_close(on_gpu[0].cpu(), host[0])
            assert not torch.equal(host[0], grads[0])  # the bound was reached


def test_a_bucket_without_gradient_leaves_the_estimate() -> None:
    """A bucket that got no gradient in a whole backward (``forget``) no longer counts among those still to come:
    the next backward's first bucket is clipped by its own norm alone."""
    clip = BucketwiseNormClip(MAX_NORM, 2)
    clip.clip_(ClipProgress(together=False), 1, [torch.full((4,), 10.0)], 400.0)  # bucket 1: norm 20
    first = [torch.full((4,), 0.1)]  # norm 0.2, below the bound
    clip.clip_(ClipProgress(together=False), 0, first, 0.04)
    assert float(first[0][0]) < 0.1  # bucket 1's latest norm still counted: clipped
    clip.forget(1)
    again = [torch.full((4,), 0.1)]
    clip.clip_(ClipProgress(together=False), 0, again, 0.04)
    assert torch.equal(again[0], torch.full((4,), 0.1))  # alone it is below the bound: unchanged
