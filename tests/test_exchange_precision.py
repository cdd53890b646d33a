"""bf16 parameters across 2 real processes (gloo, CPU): the exchange loses no update to low-precision rounding.

Why: the anchor and deltas of a bf16 model used to be bf16. Rank 0 moves a weight from 1 by 2^-7 (bf16's spacing
at 1) while rank 1 moves it by +2: the bf16 sum 2 + 2^-7 rounds to 2 and rank 0's update vanished from every
replica, for good -- rank 1 moving back by -2 left 1.0 instead of 1 + 2^-7. With a float32 anchor and per-rank base the final value is exact.
The phases are separated by consistent points, so the test does not depend on when exchange rounds run.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_pdasgd.distributed.replica_exchange import ReplicaExchange
from lightning_pdasgd.engine.parameter_buckets import make_buckets


def _small(dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` at 1.0: representable as 1 + small, lost next to 3.0 (spacing 2 * small)."""
    return torch.finfo(dtype).eps


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _add(bucket: Any, value: float) -> None:
    """One local update of every element of the bucket, through the bucket's update path (counted, locked)."""

    def step(staleness: int, version: int, targets: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for target in targets:
                target.add_(value)

    bucket.update(bucket.version, step)


def _rank(rank: int, port: int, out: str, dtype_name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dtype = getattr(torch, dtype_name)
        module = nn.Module()
        module.weight = nn.Parameter(torch.ones(8, dtype=dtype))
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        buckets = make_buckets(module, optimizer, 0)
        errors: list[BaseException] = []
        exchange = ReplicaExchange(
            buckets, module, optimizer, group=dist.new_group(backend="gloo"), interval_s=0.005, timeout_s=60,
            on_error=errors.append, merge="sum",  # the sums' precision is what is tested
        )
        exchange.start()

        def raise_if_failed() -> None:
            if errors:
                raise errors[0]

        _add(buckets[0], _small(dtype) if rank == 0 else 2.0)  # phase 1: 1 + 2^-7 + 2 in exact arithmetic
        exchange.consistent_point("epoch_end", False, raise_if_failed)
        after_first = module.weight.detach().float().clone()
        if rank == 1:
            _add(buckets[0], -2.0)  # phase 2: back to 1 + 2^-7
        exchange.consistent_point("fit_end", True, raise_if_failed)
        exchange.join(60)
        torch.save({"first": after_first, "final": module.weight.detach().float().clone(), "errors": repr(errors),
                    "rounds": exchange.rounds}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_low_precision_updates_are_not_lost_across_ranks(tmp_path: Path, dtype_name: str) -> None:
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path), dtype_name), nprocs=2, join=True,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for rank, result in enumerate(results):
        seen = f"rank {rank} of {results}"  # both ranks' values and exchange rounds, should this ever fail again
        assert result["errors"] == "[]", seen
        # the replica holds the anchor rounded once: 3 + 2^-7 is not representable, 3 is the nearest value
        assert torch.equal(result["first"], torch.full((8,), 3.0)), seen
        assert torch.equal(result["final"], torch.full((8,), 1.0 + _small(getattr(torch, dtype_name)))), seen
    assert torch.equal(results[0]["final"], results[1]["final"])


if __name__ == "__main__":  # pragma: no cover - spawned children import this module by name
    sys.exit(0)
