"""The CUDA path (issue #13): exact, equal to plain Lightning, bf16, sync-free, memory-bounded, two ranks.

Skipped without CUDA; ``bash benchmarks/gpu_all.sh OUT`` runs these and the GPU benchmark on a GPU machine.
Only torch <= 2.11 APIs are used (the GPU machine's version).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.engine.nonfinite import NonFiniteError
from tests.models import LR, LinearLoss, integer_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_trainer(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="gpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


# ----------------------------------------------------------------------------------------------- exact sums
@pytest.mark.parametrize(
    "strategy_kwargs",
    [dict(backward_threads=2, max_in_flight=2), dict(backward_threads=3, max_in_flight=3),
     dict(backward_threads=4, max_in_flight=8), dict(backward_threads=2, max_in_flight=4, layerwise=False)],
    ids=["1:2", "1:3", "8-in-flight", "dasgd"],
)
def test_no_update_lost_or_doubled_on_cuda(strategy_kwargs: dict[str, Any]) -> None:
    """loss linear in the weights, SGD, float64, power-of-two lr: the final weights are exactly -lr * sum(x)."""
    width, steps = 512, 300
    loader = integer_batches(steps, width)
    total = torch.cat([batch for (batch,) in loader]).sum(dim=0)
    model = LinearLoss(width)
    strategy = PDASGDStrategy(**strategy_kwargs)
    trainer = L.Trainer(strategy=strategy, max_epochs=1, **gpu_trainer())
    trainer.fit(model, loader)
    assert trainer.global_step == steps
    assert model.first.device.type == "cuda"
    assert torch.equal(model.first.detach().cpu(), -LR * total)
    assert torch.equal(model.second.detach().cpu(), -LR * 2 * total)
    assert torch.equal(model.shared.weight.detach().cpu().squeeze(0), -LR * 2 * total)
    assert strategy.stats.total_backwards == steps


# ----------------------------------------------------------------------------------------------- plain equality
class Classifier(L.LightningModule):
    """An MLP with BatchNorm on synthetic data (no dataset download on the GPU machine)."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 10))
        self.optimizer = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        optimizer = {
            "sgd_momentum": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
            "adam": lambda: torch.optim.Adam(params, lr=1e-2),
            "adamw_fused": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, fused=True),
            "sgd_fused": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True),
        }[self.optimizer]()
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 7, 0.5)}


def _synthetic(count: int = 1280, batch_size: int = 32, device: str = "cpu") -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(count, 64, generator=generator)
    y = (x[:, :10].argmax(dim=1) + (x[:, 10] > 1).long()) % 10
    return DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=batch_size)


def _fit(strategy: Any, optimizer: str, steps: int = 40, precision: str = "32-true") -> Classifier:
    L.seed_everything(1234)
    model = Classifier(optimizer)
    trainer = L.Trainer(strategy=strategy, max_steps=steps, precision=precision, **gpu_trainer())
    trainer.fit(model, _synthetic())
    return model


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam", "adamw_fused", "sgd_fused"])
def test_one_in_flight_matches_plain_lightning_on_cuda(optimizer: str) -> None:
    plain = _fit("auto", optimizer)
    pdasgd = _fit(PDASGDStrategy(max_in_flight=1), optimizer)
    for key, value in plain.state_dict().items():
        difference = (value.double() - pdasgd.state_dict()[key].double()).abs().max().item()
        assert difference <= 1e-5, f"{key} differs by {difference}"


def test_bf16_mixed_matches_plain_and_trains_asynchronously() -> None:
    plain = _fit("auto", "sgd_momentum", precision="bf16-mixed")
    one = _fit(PDASGDStrategy(max_in_flight=1), "sgd_momentum", precision="bf16-mixed")
    for key, value in plain.state_dict().items():
        difference = (value.double() - one.state_dict()[key].double()).abs().max().item()
        assert difference <= 1e-5, f"{key} differs by {difference}"
    asynchronous = _fit(PDASGDStrategy(backward_threads=2, max_in_flight=3), "adam", steps=80, precision="bf16-mixed")
    loader = _synthetic(device="cuda")
    asynchronous.cuda().eval()
    with torch.no_grad():
        x, y = next(iter(loader))
        accuracy = (asynchronous.net(x).argmax(dim=1) == y).float().mean().item()
    assert all(torch.isfinite(p).all() for p in asynchronous.parameters())
    assert accuracy > 0.3, accuracy  # chance is 0.1


def test_bf16_true_parameters_linear_sum_is_exact() -> None:
    """bf16 parameters (``bf16-true``): small integer sums stay exact, so no update may be lost or doubled."""
    width, steps = 64, 32
    loader = integer_batches(steps, width, batch_size=1)
    total = torch.cat([batch for (batch,) in loader]).sum(dim=0)

    class Small(LinearLoss):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1.0)

    model = Small(width)
    trainer = L.Trainer(strategy=PDASGDStrategy(backward_threads=2, max_in_flight=3), max_epochs=1,
                        precision="bf16-true", **gpu_trainer())
    trainer.fit(model, loader)
    assert model.first.dtype == torch.bfloat16
    assert torch.equal(model.first.detach().double().cpu(), -total)  # |total| <= 256: exact in bf16


# ----------------------------------------------------------------------------------------------- no host sync
class SyncGuard(Callback):
    """``torch.cuda.set_sync_debug_mode("error")`` for steps [first, last): any host sync there raises."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        torch.cuda.set_sync_debug_mode("error" if self.first <= batch_idx < self.last else "default")

    def on_train_batch_end(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")

    def teardown(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")


def _guarded_fit(strategy: Any, **trainer_kwargs: Any) -> BaseException | None:
    L.seed_everything(0)
    model = Classifier("sgd_momentum")
    trainer = L.Trainer(strategy=strategy, max_epochs=1, callbacks=[SyncGuard(10, 30)], **gpu_trainer(),
                        **trainer_kwargs)
    try:
        trainer.fit(model, _synthetic(device="cuda"))  # data already on the GPU: no host-to-device copy
    except RuntimeError as error:
        return error
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_no_host_sync_in_steady_state_steps(threads: int) -> None:
    """Steady-state steps (the loop thread, the backward threads, autograd's device thread, every hook) never
    synchronise with the GPU: forwards, hand-offs, the non-finite check, bucket updates, stream recycling."""
    plain_error = _guarded_fit("auto")
    if plain_error is not None:
        pytest.skip(f"plain Lightning itself synchronises in a steady-state step here: {plain_error}")
    error = _guarded_fit(PDASGDStrategy(backward_threads=threads, max_in_flight=threads + 1, metrics="off"))
    assert error is None, f"PD-ASGD synchronised with the GPU in a steady-state step: {error!r}"


def test_no_host_sync_when_clipping_by_norm_per_bucket() -> None:
    """Clipping by norm with several losses in flight (each bucket by the total known then, ``norm_clipping.py``)
    keeps every norm on the device."""
    plain_error = _guarded_fit("auto", gradient_clip_val=1.0)
    if plain_error is not None:
        pytest.skip(f"plain Lightning itself synchronises when clipping here: {plain_error}")
    error = _guarded_fit(PDASGDStrategy(backward_threads=2, max_in_flight=3, metrics="off"), gradient_clip_val=1.0)
    assert error is None, f"PD-ASGD synchronised with the GPU while clipping by norm: {error!r}"


# ----------------------------------------------------------------------------------------------- non-finite
class NaNAt(Classifier):
    def __init__(self, optimizer: str, bad_step: int) -> None:
        super().__init__(optimizer)
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == self.bad_step else loss


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "sgd_fused"])
def test_nonfinite_is_skipped_on_device_and_reported(optimizer: str) -> None:
    L.seed_everything(0)
    model = NaNAt(optimizer, bad_step=5)
    strategy = PDASGDStrategy(backward_threads=2, max_in_flight=3, nonfinite="skip")
    L.Trainer(strategy=strategy, max_steps=20, **gpu_trainer()).fit(model, _synthetic())
    assert all(torch.isfinite(p).all() for p in model.parameters()), "no NaN reached the weights"
    assert strategy.stats.total_skipped > 0

    L.seed_everything(0)
    with pytest.raises(NonFiniteError, match="on-device check"):
        L.Trainer(strategy=PDASGDStrategy(backward_threads=2, max_in_flight=3), max_steps=20,
                  **gpu_trainer()).fit(NaNAt(optimizer, bad_step=5), _synthetic())


# ----------------------------------------------------------------------------------------------- memory
class Wide(L.LightningModule):
    """Parameters dominate memory (4 x 16 MiB); activations are a few KiB."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.layers(x).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


def _peak_memory(strategy: Any) -> tuple[int, int]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = Wide()
    data = DataLoader(TensorDataset(torch.randn(64, 2048)), batch_size=2)
    L.Trainer(strategy=strategy, max_epochs=1, **gpu_trainer()).fit(model, data)
    torch.cuda.synchronize()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return torch.cuda.max_memory_allocated() - base, param_bytes


@pytest.mark.parametrize("in_flight", [1, 3])
def test_memory_bounded_by_in_flight_copies(in_flight: int) -> None:
    plain, param_bytes = _peak_memory("auto")
    pdasgd, _ = _peak_memory(
        PDASGDStrategy(backward_threads=min(in_flight, 2), max_in_flight=in_flight, staleness_compensation="none")
    )
    # plain: params + grads + momentum; PD-ASGD adds one stash per batch in flight and in-flight gradients
    assert pdasgd <= plain + (in_flight + 1) * param_bytes, (pdasgd / param_bytes, plain / param_bytes)


# ----------------------------------------------------------------------------------------------- two ranks
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exchange_rank(rank: int, port: int, out: str, dtype_name: str, updates: int) -> None:
    """One rank on cuda:0: updates from a backward-like thread while the exchange runs rounds (gloo on CUDA)."""
    import threading

    from lightning_pdasgd.distributed.replica_exchange import ReplicaExchange
    from lightning_pdasgd.engine.parameter_buckets import make_buckets

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dtype = getattr(torch, dtype_name)
        module = nn.Module()
        module.a = nn.Linear(256, 256, bias=False, device="cuda", dtype=dtype)
        module.b = nn.Linear(256, 256, device="cuda", dtype=dtype)
        for param in module.parameters():
            nn.init.zeros_(param)
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        buckets = make_buckets(module, optimizer, 0)
        errors: list[BaseException] = []
        exchange = ReplicaExchange(buckets, module, optimizer, group=dist.new_group(backend="gloo"),
                                   interval_s=0.001, timeout_s=120, on_error=errors.append, merge="sum")
        exchange.start()
        step_value = 1.0 if rank == 0 else 2.0  # small integers: exact in bf16 while |sum| <= 256

        def updater() -> None:
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):  # like autograd's stream in a hook: not the update stream
                for _ in range(updates):
                    for bucket in buckets:
                        grads = [torch.full_like(p, -step_value) for p in bucket.params]

                        def step(staleness: int, version: int, targets: list[torch.Tensor], grads: Any = grads) -> None:
                            for grad in grads:  # allocated on `side`, read on the update stream
                                grad.record_stream(torch.cuda.current_stream())
                            torch._foreach_sub_(targets, grads)

                        bucket.update(bucket.version, step)

        thread = threading.Thread(target=updater)
        thread.start()
        thread.join(120)

        def raise_if_failed() -> None:
            if errors:
                raise errors[0]

        exchange.consistent_point("fit_end", True, raise_if_failed)
        exchange.join(120)
        torch.save({name: p.detach().float().cpu() for name, p in module.named_parameters()} | {"errors": repr(errors)},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_two_ranks_on_one_gpu_exchange_cuda_tensors(tmp_path: Path, dtype_name: str) -> None:
    updates = 40
    mp.start_processes(_exchange_rank, args=(_free_port(), str(tmp_path), dtype_name, updates), nprocs=2,
                       join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    expected = float(updates * (1 + 2))  # every update of both ranks, exactly once
    for result in results:
        assert result.pop("errors") == "[]"
        for name, value in result.items():
            assert torch.equal(value, torch.full_like(value, expected)), (name, value.unique())
