"""Parameter buckets on their own (no Trainer): how ``make_buckets`` groups parameters, and how a bucket's reads
and writes keep what a forward read intact (copy-on-write), count versions and follow a storage given from
outside (``param.data = x``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_pdasgd.engine.parameter_buckets import ParameterBucket, make_buckets


def _net() -> nn.Sequential:
    """Linear 4->4 (20 elements), ReLU, Linear 4->4 (20), Linear 4->2 (10)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))


def _names(buckets: list[ParameterBucket]) -> list[list[str]]:
    return [bucket.names for bucket in buckets]


def _add(amount: float) -> Callable[[int, int, list[Tensor]], None]:
    def step(staleness: int, version: int, targets: list[Tensor]) -> None:
        with torch.no_grad():
            for target in targets:
                target.add_(amount)

    return step


# ----------------------------------------------------------------------------------------------- grouping
def test_one_bucket_per_module_in_backward_order_with_bucket_numel_zero() -> None:
    """``bucket_numel=0``: each module's parameters form one bucket, the last registered module first (the order in
    which backward produces gradients), and indices follow list positions."""
    net = _net()
    buckets = make_buckets(net, torch.optim.SGD(net.parameters(), lr=0.1), 0)
    assert _names(buckets) == [["3.bias", "3.weight"], ["2.bias", "2.weight"], ["0.bias", "0.weight"]]
    assert [bucket.index for bucket in buckets] == [0, 1, 2]
    assert [bucket.numel for bucket in buckets] == [10, 20, 20]
    assert all(bucket.version == 0 for bucket in buckets)


def test_auto_is_65536_elements_and_a_bucket_per_module_below_that() -> None:
    """``bucket_numel="auto"`` (the default): a model under 65,536 trained elements gets a bucket per module (in one
    bucket every layer would read a full update stale); a larger one joins modules up to 65,536 elements."""
    small = _net()
    assert _names(make_buckets(small, torch.optim.SGD(small.parameters(), lr=0.1), "auto")) == _names(
        make_buckets(small, torch.optim.SGD(small.parameters(), lr=0.1), 0)
    )
    large = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8), nn.Linear(8, 8))  # 65,792 + 2,056 + 72 elements
    buckets = make_buckets(large, torch.optim.SGD(large.parameters(), lr=0.1), "auto")
    assert _names(buckets) == [["2.bias", "2.weight", "1.bias", "1.weight", "0.bias", "0.weight"]]
    assert len(make_buckets(large, torch.optim.SGD(large.parameters(), lr=0.1), 0)) == 3


def test_modules_join_a_bucket_until_it_holds_bucket_numel_elements() -> None:
    """Consecutive modules join the current bucket while it holds fewer than ``bucket_numel`` elements; a large
    ``bucket_numel`` puts everything into one bucket."""
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    # 10 < 25: layer 2 joins layer 3's bucket; 30 >= 25: layer 0 starts a new one
    assert _names(make_buckets(net, optimizer, 25)) == [
        ["3.bias", "3.weight", "2.bias", "2.weight"],
        ["0.bias", "0.weight"],
    ]
    assert _names(make_buckets(net, optimizer, 10**9)) == [
        ["3.bias", "3.weight", "2.bias", "2.weight", "0.bias", "0.weight"]
    ]
    # a module's parameters stay together even when its first one alone exceeds bucket_numel
    assert _names(make_buckets(net, optimizer, 1)) == _names(make_buckets(net, optimizer, 0))


def test_a_bucket_never_spans_two_param_groups() -> None:
    """Parameters of different param groups never share a bucket, not even a module's weight and bias; each bucket
    records its group."""
    net = _net()
    optimizer = torch.optim.SGD(
        [
            {"params": [net[0].weight, net[0].bias, net[2].weight]},
            {"params": [net[2].bias, net[3].weight, net[3].bias], "lr": 0.01},
        ],
        lr=0.1,
    )
    buckets = make_buckets(net, optimizer, 10**9)
    assert _names(buckets) == [["3.bias", "3.weight", "2.bias"], ["2.weight", "0.bias", "0.weight"]]
    assert [bucket.group_index for bucket in buckets] == [1, 0]


def test_a_bucket_never_spans_two_dtypes() -> None:
    """A float64 module between float32 ones gets its own bucket, however large ``bucket_numel`` is."""
    net = _net()
    net[2].double()
    buckets = make_buckets(net, torch.optim.SGD(net.parameters(), lr=0.1), 10**9)
    assert _names(buckets) == [["3.bias", "3.weight"], ["2.bias", "2.weight"], ["0.bias", "0.weight"]]
    assert [bucket.dtype for bucket in buckets] == [torch.float32, torch.float64, torch.float32]


def test_frozen_parameters_get_no_bucket() -> None:
    """A parameter that does not require grad is left out (nothing updates it)."""
    net = _net()
    net[0].weight.requires_grad_(False)
    buckets = make_buckets(net, torch.optim.SGD(net.parameters(), lr=0.1), 0)
    assert _names(buckets) == [["3.bias", "3.weight"], ["2.bias", "2.weight"], ["0.bias"]]


def test_an_optimized_tensor_outside_the_module_is_rejected() -> None:
    """Every optimized tensor must be a parameter of the module (else no forward could read a consistent copy of
    it); an optimizer with nothing trainable is rejected too."""
    net = _net()
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not a parameter"):
        make_buckets(net, torch.optim.SGD([*net.parameters(), stray], lr=0.1), 0)
    for param in net.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        make_buckets(net, torch.optim.SGD(net.parameters(), lr=0.1), 0)


# ----------------------------------------------------------------------------------------------- copy-on-write
def _linear_bucket() -> tuple[nn.Linear, ParameterBucket]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    (bucket,) = make_buckets(layer, torch.optim.SGD(layer.parameters(), lr=0.1), 0)
    assert bucket.names == ["bias", "weight"]
    return layer, bucket


def test_a_read_aliases_the_live_storage_without_a_copy() -> None:
    """A forward's read is the live storage itself (no copy per forward)."""
    layer, bucket = _linear_bucket()
    read, version = bucket.read()
    assert version == 0
    assert [t.data_ptr() for t in read.tensors] == [layer.bias.data_ptr(), layer.weight.data_ptr()]
    bucket.release(read)


def test_an_update_while_a_forward_reads_writes_a_new_storage_and_keeps_the_read_values() -> None:
    """Copy-on-write: while a reader holds the live version, an update goes into another storage that becomes live
    (the parameter object stays the same); the reader's tensors keep exactly the values it read."""
    layer, bucket = _linear_bucket()
    weight = layer.weight
    before = [t.clone() for t in bucket.aliases]
    read, version = bucket.read()
    bucket.update(version, _add(1.0))
    assert layer.weight is weight
    assert all(torch.equal(t, b) for t, b in zip(read.tensors, before))  # what the forward read is unchanged
    assert torch.equal(layer.bias.detach(), before[0] + 1) and torch.equal(layer.weight.detach(), before[1] + 1)
    assert layer.weight.data_ptr() != read.tensors[1].data_ptr()
    assert [t.data_ptr() for t in bucket.aliases] == [layer.bias.data_ptr(), layer.weight.data_ptr()]
    bucket.release(read)


def test_an_update_without_readers_writes_in_place() -> None:
    """No forward reads the live storage: the update writes into it (no copy, no re-pointing)."""
    layer, bucket = _linear_bucket()
    pointers = [layer.bias.data_ptr(), layer.weight.data_ptr()]
    before = layer.weight.detach().clone()
    bucket.update(0, _add(1.0))
    read, _ = bucket.read()
    bucket.release(read)  # a finished reader no longer blocks in-place writes
    bucket.update(bucket.version, _add(1.0))
    assert [layer.bias.data_ptr(), layer.weight.data_ptr()] == pointers
    assert torch.equal(layer.weight.detach(), before + 2)


def test_a_released_version_is_reused_for_the_next_copy_on_write() -> None:
    """The storage of a finished read goes back to a pool: the next copy-on-write writes into it instead of
    allocating (the weights cost one buffer per version still read)."""
    layer, bucket = _linear_bucket()
    old, _ = bucket.read()
    bucket.update(0, _add(1.0))  # copy-on-write: `old` keeps the original storage
    bucket.release(old)
    newer, _ = bucket.read()
    bucket.update(bucket.version, _add(1.0))  # copy-on-write again, into `old`'s storage
    assert layer.weight.data_ptr() == old.tensors[1].data_ptr()
    bucket.release(newer)


def test_a_version_released_as_not_reusable_is_never_written_again() -> None:
    """``release(reusable=False)`` (a forward never handed off, whose graph may live on): its storage is never
    written, not even when it is the live one and nobody reads it any more."""
    layer, bucket = _linear_bucket()
    read, _ = bucket.read()
    kept = [t.clone() for t in read.tensors]
    bucket.release(read, reusable=False)
    for _ in range(3):
        bucket.update(bucket.version, _add(1.0))
    assert all(torch.equal(t, k) for t, k in zip(read.tensors, kept))
    assert torch.equal(layer.weight.detach(), kept[1] + 3)
    assert layer.weight.data_ptr() != read.tensors[1].data_ptr()


def test_versions_count_updates_and_staleness_is_measured_from_the_read() -> None:
    """Every update adds one to the version; ``step`` sees the staleness (updates since the read) and the version
    before it, and ``update`` returns the staleness."""
    _, bucket = _linear_bucket()
    seen: list[tuple[int, int]] = []

    def record(staleness: int, version: int, targets: list[Tensor]) -> None:
        seen.append((staleness, version))

    read, version = bucket.read()
    assert bucket.update(version, record) == 0
    assert bucket.update(bucket.version, record) == 0
    assert bucket.update(version, record) == 2  # read at version 0, two updates since
    assert bucket.version == 3
    assert seen == [(0, 0), (0, 1), (2, 2)]
    newer, newer_version = bucket.read()
    assert newer_version == 3
    bucket.release(read)
    bucket.release(newer)


def test_read_into_copies_the_live_values_and_returns_their_version() -> None:
    """``read_into`` (a private copy for weight prediction) writes the live values into the given leaves; a
    ``fill`` writes something else and gets the live values and the version."""
    layer, bucket = _linear_bucket()
    bucket.update(0, _add(1.0))
    leaves = [torch.empty_like(t) for t in bucket.aliases]
    assert bucket.read_into(leaves) == 1
    assert torch.equal(leaves[1], layer.weight.detach()) and leaves[1].data_ptr() != layer.weight.data_ptr()
    seen: list[int] = []

    def fill(live: list[Tensor], targets: list[Tensor], version: int) -> None:
        seen.append(version)
        for target, value in zip(targets, live):
            target.copy_(value * 2)

    bucket.read_into(leaves, fill)
    assert seen == [1] and torch.equal(leaves[1], layer.weight.detach() * 2)


# ----------------------------------------------------------------------------------------------- external storage
def test_a_storage_given_from_outside_keeps_receiving_updates() -> None:
    """``param.data = x`` (a lottery-ticket reset keeps an alias ``x``): once followed, ``x`` is the live storage
    and every update goes into it in place, even while a forward reads (forwards then read a private copy, which
    the updates leave alone)."""
    layer, bucket = _linear_bucket()
    external = torch.full_like(layer.weight, 5.0)
    layer.weight.data = external
    assert [id(p) for p in bucket.given_from_outside()] == [id(layer.weight)]
    assert bucket.follow_external_storage() is True
    assert bucket.follow_external_storage() is False  # already followed

    reader, _ = bucket.read()
    assert reader.tensors[1].data_ptr() != external.data_ptr()  # a private copy, not an alias
    assert torch.equal(reader.tensors[1], external)
    bucket.update(bucket.version, _add(1.0))
    bucket.update(bucket.version, _add(1.0))
    assert layer.weight.data_ptr() == external.data_ptr()
    assert torch.equal(external, torch.full_like(external, 7.0))
    assert torch.equal(reader.tensors[1], torch.full_like(external, 5.0))  # the copy the forward read is intact
    assert id(layer.weight) in {id(p) for p in bucket.given_from_outside()}  # still, for a rebuild
    bucket.release(reader)


def test_the_replaced_storage_stays_with_the_forward_that_read_it() -> None:
    """A forward that read before ``param.data = x`` keeps the swapped parameter's old storage, as read."""
    layer, bucket = _linear_bucket()
    read, _ = bucket.read()
    old_weight = read.tensors[1].clone()
    layer.weight.data = torch.full_like(layer.weight, 5.0)
    bucket.follow_external_storage()
    bucket.update(bucket.version, _add(1.0))
    assert torch.equal(read.tensors[1], old_weight)
    bucket.release(read)


def test_the_other_parameters_of_the_bucket_stay_as_an_earlier_forward_read_them() -> None:
    """Module docstring: "a write never goes in place into storage that a live graph still reads". After only
    ``weight`` was given from outside, a forward that read the bucket before must still see its ``bias`` as read.
    (Autograd does not notice: the leaf's version counter is not the storage's, so the gradient would silently be
    computed at the updated bias.)"""
    layer, bucket = _linear_bucket()
    read, _ = bucket.read()
    old_bias = read.tensors[0].clone()
    layer.weight.data = torch.full_like(layer.weight, 5.0)
    bucket.follow_external_storage()
    bucket.update(bucket.version, _add(1.0))
    assert torch.equal(read.tensors[0], old_bias)
    bucket.release(read)


def test_a_bucket_built_with_shared_storage_writes_in_place() -> None:
    """``make_buckets(shared=...)``: a bucket whose storage came from outside writes in place from the start (a
    rebuild keeps writing into the alias the outside code holds)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    alias = layer.weight.detach()
    (bucket,) = make_buckets(layer, torch.optim.SGD(layer.parameters(), lr=0.1), 0,
                             shared=frozenset({id(layer.weight)}))
    before = alias.clone()
    reader, _ = bucket.read()
    bucket.update(bucket.version, _add(1.0))
    assert layer.weight.data_ptr() == alias.data_ptr()
    assert torch.equal(alias, before + 1)
    assert torch.equal(reader.tensors[1], before)
    bucket.release(reader)
