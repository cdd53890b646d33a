"""Weight access: lazy layer-wise reads, the early-use fallback, and copy-on-write writes.

The staleness-by-depth test gates the engine with events so that every step interleaves the same way: the
previous backward may run only once the next forward has passed its first layer, and that forward goes on only
once the previous backward's updates are all applied. Lazy reads then read the first layer one update late and
the others fresh; reads at the step's start read every layer one update late. Both are checked against a
single-threaded simulation of exactly those delays.
"""

from __future__ import annotations

import threading
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
from lightning_pdasgd.engine.parameter_buckets import make_buckets
from lightning_pdasgd.engine.weight_stash import UNREAD
from tests.helpers import trainer_kwargs

WAIT_S = 60.0
STEPS = 8


class _Progress:
    """Counts bucket updates (from the optimizer's ``step``) and lets waiters block until a count is reached."""

    def __init__(self) -> None:
        self.updates = 0
        self.changed = threading.Condition()
        self.backward_may_run = [threading.Event() for _ in range(STEPS)]

    def wait_for_updates(self, count: int) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.updates >= count, timeout=WAIT_S):
                raise TimeoutError(f"waited for {count} bucket updates, saw {self.updates}")


class _CountingSGD(torch.optim.SGD):
    progress: _Progress  # a class attribute: the engine builds its own instances of this class, one per bucket

    def step(self, closure: Any = None) -> Any:
        result = super().step(closure)
        with self.progress.changed:
            self.progress.updates += 1
            self.progress.changed.notify_all()
        return result


class _Gate(torch.autograd.Function):
    """Identity whose backward waits until the next forward allows it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, event: threading.Event) -> torch.Tensor:  # type: ignore[override]
        ctx.event = event
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        if not ctx.event.wait(WAIT_S):
            raise TimeoutError("the next forward never released this backward")
        return grad, None


class ThreeLayers(L.LightningModule):
    """64-32-32-10, one bucket per layer; the ReLU after the first layer gates the interleaving."""

    def __init__(self, progress: _Progress, compiled: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.progress = progress
        self.net[1].register_forward_pre_hook(self._between_first_and_second)
        if compiled:  # the engine's pre-hooks run inside the compiled code (aot_eager: dynamo and AOTAutograd)
            self.net = torch.compile(self.net, backend="aot_eager")

    @torch.compiler.disable  # waits on events: runs eagerly at every call, also inside the compiled net
    def _between_first_and_second(self, module: nn.Module, args: Any) -> None:
        step = self.trainer.global_step
        if step == 0:
            return
        self.progress.backward_may_run[step - 1].set()
        self.progress.wait_for_updates(3 * step)  # every bucket has the previous step's update

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        if batch_idx < STEPS - 1:
            out = _Gate.apply(out, self.progress.backward_may_run[batch_idx])
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        _CountingSGD.progress = self.progress
        return _CountingSGD(self.parameters(), lr=0.1)


def _batches() -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS * 8, 16, generator=generator)
    y = torch.randint(0, 4, (STEPS * 8,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _simulate(first_layer_delay: int, other_delay: int) -> list[torch.Tensor]:
    """Single-threaded SGD where step t's forward reads layer 1 at version t - first_layer_delay and the other
    layers at version t - other_delay (version = updates applied so far)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    history = [[p.detach().clone() for p in net.parameters()]]
    live = [p.detach().clone() for p in net.parameters()]
    for t, (x, y) in enumerate(_batches()):
        delays = [first_layer_delay] * 2 + [other_delay] * 4
        read = [history[max(t - d, 0)][i].clone().requires_grad_(True) for i, d in enumerate(delays)]
        h = torch.relu(nn.functional.linear(x, read[0], read[1]))
        h = torch.relu(nn.functional.linear(h, read[2], read[3]))
        loss = nn.functional.cross_entropy(nn.functional.linear(h, read[4], read[5]), y)
        grads = torch.autograd.grad(loss, read)
        live = [w - 0.1 * g for w, g in zip(live, grads)]
        history.append([w.clone() for w in live])
    return live


@pytest.mark.parametrize(("lazy", "compiled"), [(True, False), (False, False), (True, True)],
                         ids=["lazy", "at-start", "lazy-torch-compiled"])
def test_each_layer_is_read_when_the_forward_reaches_it(lazy: bool, compiled: bool) -> None:
    progress = _Progress()
    model = ThreeLayers(progress, compiled)
    strategy = PDASGDStrategy(backward_threads=1, max_in_flight=2, bucket_numel=0, lazy_reads=lazy,
                              staleness_compensation="none", divergence_guard=False, synchronous_warmup=0)
    trainer = L.Trainer(strategy=strategy, **trainer_kwargs(max_epochs=1))
    trainer.fit(model, train_dataloaders=_batches())

    stats = trainer.strategy.stats
    # steps 1..7 read the previous step's update late: the first layer only (lazy), or every layer (at start)
    stale_buckets = 1 if lazy else 3
    assert stats.total_updates == 2 * 3 * STEPS  # weight + bias of 3 layers, every step
    assert stats.total_staleness_sum == 2 * stale_buckets * (STEPS - 1)
    expected = _simulate(first_layer_delay=1, other_delay=0 if lazy else 1)
    for got, want in zip(model.net.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


class _EarlyUses(L.LightningModule):
    """Parameters used before their module's forward: in ``training_step``, by a functional call on a module that
    never runs, and a weight tied into a module that runs before its first owner."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.scale = nn.Parameter(torch.ones(16))  # owned by the LightningModule, whose forward never runs
        self.body = nn.Linear(16, 16)
        self.unused_owner = nn.Linear(16, 16)  # its weight is only used functionally
        self.head = nn.Linear(16, 4)
        self.early_tied = nn.Linear(16, 4)
        self.early_tied.weight = self.head.weight  # tied: `early_tied` runs before `head`

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = x * self.scale
        side = self.early_tied(x)
        h = torch.relu(self.body(x) + nn.functional.linear(x, self.unused_owner.weight))
        return nn.functional.cross_entropy(self.head(h) + 0.1 * side, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(model: L.LightningModule, strategy: Any) -> L.Trainer:
    trainer = L.Trainer(strategy=strategy, **trainer_kwargs(max_epochs=2))
    trainer.fit(model, train_dataloaders=_batches())
    return trainer


def test_parameters_used_before_their_module_read_consistent_values() -> None:
    plain = _EarlyUses()
    _fit(plain, "auto")
    lazy = _EarlyUses()
    _fit(lazy, PDASGDStrategy(max_in_flight=1, bucket_numel=0))
    for (name, got), want in zip(lazy.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} differs from plain Lightning")
    # asynchronous: the same shapes train without an error
    _fit(_EarlyUses(), PDASGDStrategy(bucket_numel=0))


def test_the_first_forward_finds_which_buckets_to_read_early() -> None:
    model = _EarlyUses()
    updater = LayerwiseUpdater(model, model.configure_optimizers(), bucket_numel=0)
    batch = next(iter(_batches()))
    for _ in range(2):  # the first forward detects; the second reads the rest lazily
        stash = updater.stash()
        with _torch_internals.reparametrized(model, stash.tensors), updater.reading(stash):
            model.training_step(batch, 0)
        assert UNREAD not in stash.versions
        updater.release(stash, reusable=False)
    early = {name for index in updater.reads.early for name in updater.buckets[index].names}
    assert early == {"scale", "unused_owner.weight", "unused_owner.bias"}  # a module's parameters share a bucket
    updater.close()


class _LateEarlyUse(_EarlyUses):
    """Uses ``body.weight`` before ``body`` runs only from the third step on: the first step cannot see it."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx >= 2:
            x = x + self.body.weight.sum() * 0
        return super().training_step((x, y), batch_idx)


def test_an_early_use_the_first_step_missed_fails_loudly_with_the_setting_named() -> None:
    with pytest.raises(RuntimeError) as caught:
        _fit(_LateEarlyUse(), PDASGDStrategy(max_in_flight=1, bucket_numel=0))
    assert "lazy_reads=False" in "".join(getattr(caught.value, "__notes__", []))
    _fit(_LateEarlyUse(), PDASGDStrategy(max_in_flight=1, bucket_numel=0, lazy_reads=False))


# ----------------------------------------------------------------------------------------------- copy-on-write
def _bucket() -> Any:
    """A Linear layer's bucket, its weight first (buckets list parameters in backward order)."""
    module = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    bucket = make_buckets(module, optimizer, 0)[0]
    assert bucket.names == ["bias", "weight"]
    return module, bucket


def _add_one(staleness: int, version: int, targets: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for target in targets:
            target.add_(1.0)


def test_a_write_never_touches_storage_a_forward_still_reads() -> None:
    module, bucket = _bucket()
    before = module.weight.detach().clone()
    read, version = bucket.read()
    assert read.tensors[1].data_ptr() == module.weight.data_ptr()  # the read aliases the live storage: no copy
    bucket.update(version, _add_one)
    torch.testing.assert_close(read.tensors[1], before, rtol=0, atol=0)  # what the forward read is unchanged
    torch.testing.assert_close(module.weight.detach(), before + 1, rtol=0, atol=0)  # the module sees the update
    assert module.weight.data_ptr() != read.tensors[1].data_ptr()

    live_ptr = module.weight.data_ptr()
    bucket.update(bucket.version, _add_one)  # nobody reads the live storage: in place
    assert module.weight.data_ptr() == live_ptr
    bucket.release(read)
    newer, _ = bucket.read()
    bucket.update(bucket.version, _add_one)  # copy-on-write again, into the released buffer: no new allocation
    assert module.weight.data_ptr() == read.tensors[1].data_ptr()
    torch.testing.assert_close(module.weight.detach(), before + 3, rtol=0, atol=0)
    bucket.release(newer)


def test_an_update_writes_in_place_once_its_own_backward_is_done_with_the_bucket() -> None:
    """The backward that applies an update releases its own read first: with no other forward reading the storage
    the update writes in place (no copy); another forward's read still gets copy-on-write."""
    module, bucket = _bucket()
    before = module.weight.detach().clone()
    own, version = bucket.read()
    live_ptr = module.weight.data_ptr()
    bucket.update(version, _add_one, finished_read=own)
    assert module.weight.data_ptr() == live_ptr, "in place: the only read was the applying backward's own"
    torch.testing.assert_close(module.weight.detach(), before + 1, rtol=0, atol=0)

    own, version = bucket.read()
    other, _ = bucket.read()  # a second forward in flight reads the same storage
    bucket.update(version, _add_one, finished_read=own)
    assert module.weight.data_ptr() != live_ptr, "copy-on-write: another forward still reads the storage"
    torch.testing.assert_close(other.tensors[1], before + 1, rtol=0, atol=0)
    torch.testing.assert_close(module.weight.detach(), before + 2, rtol=0, atol=0)
    bucket.release(other)


class _StoragesSeen(L.Callback):
    """The storage of every parameter after each step."""

    def __init__(self) -> None:
        self.storages: list[tuple[int, ...]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.storages.append(tuple(param.data_ptr() for param in module.parameters()))


def test_one_loss_in_flight_updates_every_bucket_in_place_and_exactly() -> None:
    """The engine at one loss in flight (the suite's gate; the synchronous warm-up and the guard's fallback run it):
    each update finds only its own backward's read, which that backward no longer needs, so no bucket is ever
    copied (the parameters keep their storage), and the result is still plain Lightning's bit for bit, with a
    weight tied into a module that runs before its owner."""
    plain = _EarlyUses()
    L.Trainer(strategy="auto", **trainer_kwargs(max_epochs=2)).fit(plain, train_dataloaders=_batches())
    engine, seen = _EarlyUses(), _StoragesSeen()
    strategy = PDASGDStrategy(max_in_flight=1, bucket_numel=0, staleness_compensation="none")
    L.Trainer(strategy=strategy, callbacks=[seen], **trainer_kwargs(max_epochs=2)).fit(
        engine, train_dataloaders=_batches())
    assert strategy.stats.total_updates > 0, "the updates went through the engine"  # type: ignore[attr-defined]
    assert len(seen.storages) > 2 and len(set(seen.storages)) == 1, "a bucket was copied"
    for (name, got), want in zip(engine.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} differs from plain Lightning")


def test_an_exchange_merge_is_copy_on_write_too() -> None:
    module, bucket = _bucket()
    before = module.bias.detach().clone()
    read, _ = bucket.read()
    bucket.merge(lambda targets: [target.add_(2.0) for target in targets], remote_updates=3)
    torch.testing.assert_close(read.tensors[0], before, rtol=0, atol=0)
    torch.testing.assert_close(module.bias.detach(), before + 2, rtol=0, atol=0)
    assert bucket.version == 3
    snapshot = [torch.empty_like(t) for t in bucket.aliases]
    bucket.snapshot_into(snapshot)
    torch.testing.assert_close(snapshot[0], before + 2, rtol=0, atol=0)
    bucket.release(read)


def test_a_forward_that_was_never_handed_off_pins_what_it_read() -> None:
    module, bucket = _bucket()
    read, _ = bucket.read()
    bucket.release(read, reusable=False)  # its graph may still live: the storage must never be written again
    pinned_ptr = read.tensors[1].data_ptr()
    for _ in range(3):
        bucket.update(bucket.version, _add_one)
        assert module.weight.data_ptr() != pinned_ptr


class _RepointAtEpochEnd(L.Callback):
    """Gives a parameter new storage from outside the engine (``param.data = x``), as Lightning's lottery-ticket
    pruning and ``torch.nn.utils.prune.remove`` do."""

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        module.body.weight.data = torch.full_like(module.body.weight, 0.01)


def test_storage_given_to_a_parameter_from_outside_is_followed() -> None:
    plain = _EarlyUses()
    L.Trainer(strategy="auto", callbacks=[_RepointAtEpochEnd()], **trainer_kwargs(max_epochs=2)).fit(
        plain, train_dataloaders=_batches())
    engine = _EarlyUses()
    L.Trainer(strategy=PDASGDStrategy(max_in_flight=1), callbacks=[_RepointAtEpochEnd()],
              **trainer_kwargs(max_epochs=2)).fit(engine, train_dataloaders=_batches())
    for (name, got), want in zip(engine.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} differs from plain Lightning")


class _TiedPair(nn.Module):
    """An encoder and a decoder sharing one weight (as language models tie embeddings), and an untrained buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4, bias=False)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)) * self.scale


def test_parameter_swap_puts_the_leaves_in_every_tied_place_and_follows_a_replaced_parameter() -> None:
    model = _TiedPair()
    leaves = {name: param.detach().clone().add_(1.0).requires_grad_() for name, param in model.named_parameters()}
    assert sorted(leaves) == ["decoder.bias", "encoder.weight"]  # the tied weight once, under its first name
    originals = dict(model.named_parameters())
    x = torch.randn(3, 4)
    with torch.no_grad(), _torch_internals.reparametrized(model, leaves):  # torch's own swap
        expected = model(x)
    swap = _torch_internals.ParameterSwap(model, leaves)
    for _ in range(2):  # the places found on the first call are reused on the second
        with swap.applied():
            assert model.encoder.weight is leaves["encoder.weight"] is model.decoder.weight
            assert model.decoder.bias is leaves["decoder.bias"]
            with torch.no_grad():
                torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        assert dict(model.named_parameters()) == originals
    replaced = model.decoder.bias = nn.Parameter(torch.zeros(4))  # under the swap's feet: it finds its places again
    with swap.applied():
        assert model.decoder.bias is leaves["decoder.bias"]
        model(x).sum().backward()
    assert model.decoder.bias is replaced
    assert leaves["encoder.weight"].grad is not None and leaves["decoder.bias"].grad is not None
