"""One replica of the fault-tolerance tests, as its own process (torchft expects each replica group launched alone).

``python -m tests.ft_replica OUT SLOT EPOCHS BATCHES [--die-after N] [--wait-for-replicas K]``

Every batch ``b`` adds 1 to element ``b`` of a float64 weight through the bucket's update path, so after a consistent
point the weight counts how many times each batch reached the common anchor: all ones times the epochs finished,
exactly, whoever died. ``--die-after N`` kills this process (SIGKILL, no goodbye) right after its N-th batch;
``--wait-for-replicas K --wait-epochs 0,1`` holds those epochs' starts until K replicas are in the quorum (all
started; a replacement joined).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from lightning_pdasgd.engine.parameter_buckets import make_buckets
from lightning_pdasgd.fault_tolerance.link import FaultTolerantLink
from lightning_pdasgd.fault_tolerance.torchft_adapter import FaultToleranceSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("slot", type=int)
    parser.add_argument("epochs", type=int)
    parser.add_argument("batches", type=int)
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--wait-for-replicas", type=int, default=0)
    parser.add_argument("--wait-epochs", default="")
    args = parser.parse_args()
    out = Path(args.out)

    torch.manual_seed(args.slot)  # different starts: the first quorum makes them identical
    module = nn.Module()
    module.weight = nn.Parameter(torch.full((args.batches,), float(args.slot), dtype=torch.float64))
    module.register_buffer("seen", torch.zeros(1, dtype=torch.float64))
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0, momentum=0.5)
    buckets = make_buckets(module, optimizer, 0)
    errors: list[BaseException] = []
    settings = FaultToleranceSettings(os.environ["TORCHFT_LIGHTHOUSE"], args.slot, max_replicas=4, timeout_s=2.0)
    finished = [0]
    link = FaultTolerantLink(
        settings, epoch_batches=args.batches, seed=0, interval_s=0.02, wait_timeout_s=60,
        finished_total=lambda: finished[0], lease=2, merge="sum",  # each batch adds exactly 1: counted by the test
    )
    exchange = link.connect(buckets, module, optimizer, errors.append)

    def raise_if_failed() -> None:
        if errors:
            raise errors[0]

    ready = time.monotonic()
    exchange.start()
    first_batch_after_s = None
    trained = 0
    per_epoch = []
    epoch = link.member_epoch()
    joined_at_epoch = epoch
    while epoch < args.epochs:
        if str(epoch) in args.wait_epochs.split(","):
            link.wait_for_replicas(args.wait_for_replicas, raise_if_failed)
        while (index := link.take_batch(epoch, raise_if_failed)) is not None:
            if first_batch_after_s is None:
                first_batch_after_s = time.monotonic() - ready
            step = torch.zeros(args.batches, dtype=torch.float64)
            step[index] = 1.0

            def add(staleness: int, version: int, targets: list[torch.Tensor], step: torch.Tensor = step) -> None:
                with torch.no_grad():
                    targets[0].add_(step)

            buckets[0].update(buckets[0].version, add)
            finished[0] += 1  # after the update: a round that reads this count has the update in its snapshot
            trained += 1
            if trained == args.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
        last = epoch == args.epochs - 1
        exchange.consistent_point("epoch_end", last, raise_if_failed)
        per_epoch.append(module.weight.detach().tolist())
        epoch += 1
    record = {
        "slot": args.slot,
        "trained": trained,
        "weight": module.weight.detach().tolist(),
        "per_epoch": per_epoch,
        "longest_round_s": exchange.longest_round_s,
        "failed_rounds": exchange.failed_rounds,
        "heals": link.heals,
        "joined_at_epoch": joined_at_epoch,
        "first_batch_after_s": first_batch_after_s,
        "errors": [repr(error) for error in errors],
    }
    (out / f"replica{args.slot}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
