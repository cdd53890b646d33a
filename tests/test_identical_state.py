"""A consistent point's buffers and optimizer states across 2 real processes (gloo, CPU): packed into a few
collectives, every element is reduced exactly as by its own all-reduce, and ranks holding different kinds of state
take rank 0's."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_pdasgd.distributed.identical_state import make_state_identical

_EXTRA = 6  # the index of the parameter only rank 1 updated: after the model's six


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _model(rank: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Each rank's own values: BatchNorm statistics and counter, Adam's moments and ``step`` (float32 tensors)."""
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2).to(torch.float64))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(rank + 1):  # a different step count per rank
        x = torch.randn(5, 3)
        model[2](model[1](model[0](x)).double()).sum().backward()
        optimizer.step()
    return model, optimizer


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group, device = dist.new_group(backend="gloo"), torch.device("cpu")
        model, optimizer = _model(rank)
        params = list(model.parameters())
        expected_buffers = {}  # one all-reduce per tensor, as before packing
        for name, buffer in model.named_buffers():
            value = buffer.detach().clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM if value.is_floating_point() else dist.ReduceOp.MAX)
            expected_buffers[name] = value / 2 if value.is_floating_point() else value
        expected_states = {}
        for index, param in enumerate(params):
            for key, value in optimizer.state[param].items():
                value = value.clone()
                averaged = key != "step" and value.is_floating_point()
                dist.all_reduce(value, op=dist.ReduceOp.SUM if averaged else dist.ReduceOp.MAX)
                expected_states[(index, key)] = value / 2 if averaged else value
        make_state_identical(model, optimizer, params, rank, group, device, world_size=2)
        packed = {
            "buffers": {name: buffer.clone() for name, buffer in model.named_buffers()},
            "states": {(index, key): value.clone() for index, param in enumerate(params)
                       for key, value in optimizer.state[param].items()},
            "expected_buffers": expected_buffers, "expected_states": expected_states,
        }
        extra = nn.Parameter(torch.zeros(2))  # rank 1 updated a parameter rank 0 never did: other kinds of state
        other = torch.optim.Adam([*params, extra], lr=0.1)
        other.load_state_dict({"state": {i: dict(optimizer.state[p]) for i, p in enumerate(params)},
                               "param_groups": other.state_dict()["param_groups"]})
        if rank == 1:
            extra.grad = torch.ones(2)
            other.step()
        make_state_identical(nn.Module(), other, [*params, extra], rank, group, device, world_size=2)
        packed["mismatched"] = {(i, key): value.clone() for i, p in enumerate([*params, extra])
                                for key, value in other.state.get(p, {}).items()}
        torch.save(packed, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_packed_reductions_equal_one_all_reduce_per_tensor_and_a_layout_mismatch_takes_rank_zeros(
    tmp_path: Path,
) -> None:
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for result in ranks:
        assert result["buffers"].keys() == result["expected_buffers"].keys()
        for name, value in result["buffers"].items():
            assert value.dtype == result["expected_buffers"][name].dtype
            assert torch.equal(value, result["expected_buffers"][name]), name
        assert result["states"].keys() == result["expected_states"].keys() and result["states"]
        for key, value in result["states"].items():
            assert torch.equal(value, result["expected_states"][key]), key
    assert ranks[0]["expected_states"][(0, "step")] == 2  # the maximum of the ranks' step counts
    for key, value in ranks[0]["mismatched"].items():  # rank 0's whole state on both ranks
        assert torch.equal(ranks[1]["mismatched"][key], value), key
    assert ranks[0]["mismatched"].keys() == ranks[1]["mismatched"].keys()
    assert (_EXTRA, "exp_avg") not in ranks[1]["mismatched"]  # rank 1's state of the parameter rank 0 never updated


if __name__ == "__main__":  # pragma: no cover - spawned children import this module by name
    sys.exit(0)
