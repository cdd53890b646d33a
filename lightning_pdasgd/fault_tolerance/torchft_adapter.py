"""Everything this package takes from torchft, in one place (read from torchft 0.2.0).

torchft is optional (``pip install "lightning-pdasgd[ft]"``). It provides the lighthouse that forms a quorum of the
live replicas, a process group that is reconfigured when a replica leaves or joins, and the live recovery of a
joining replica's state from a healthy peer (``Manager``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from lightning_pdasgd.errors import ConfigurationError

TORCHFT_VERSION_READ = "0.2.0"
INSTALL_HINT = 'pip install "lightning-pdasgd[ft]"'
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own variable for the lighthouse address
REPLICA_ENV = "PDASGD_REPLICA"  # this replica's slot, 0 <= slot < max_replicas


def require_torchft() -> Any:
    """The torchft module, or a ConfigurationError that says how to install it."""
    try:
        import torchft
    except ImportError as error:
        raise ConfigurationError(
            "PD-ASGD: `fault_tolerant=True` needs torchft, which is not installed. Install it with"
            f" `{INSTALL_HINT}`, or train without `fault_tolerant`."
        ) from error
    return torchft


@dataclass(frozen=True)
class FaultToleranceSettings:
    """Where the lighthouse is, which replica this is, and how long a dead peer may stall a round."""

    lighthouse: str
    slot: int
    max_replicas: int = 16
    timeout_s: float = 5.0  # a collective with a dead peer fails after this (the survivors' stall)
    quorum_timeout_s: float = 120.0  # the most a round waits for the lighthouse to form a quorum

    @classmethod
    def resolve(
        cls, lighthouse: str | None, slot: int | None, max_replicas: int, timeout_s: float, quorum_timeout_s: float
    ) -> FaultToleranceSettings:
        """Arguments first, then the environment (``TORCHFT_LIGHTHOUSE``, ``PDASGD_REPLICA``); errors name both."""
        lighthouse = lighthouse or os.environ.get(LIGHTHOUSE_ENV)
        if not lighthouse:
            raise ConfigurationError(
                "PD-ASGD: `fault_tolerant=True` needs the lighthouse's address: pass `lighthouse=\"http://host:29510\"`"
                f" or set {LIGHTHOUSE_ENV}. Start one with `torchft_lighthouse --min_replicas 1"
                " --heartbeat_timeout_ms 2000`."
            )
        if slot is None:
            value = os.environ.get(REPLICA_ENV)
            if value is None:
                raise ConfigurationError(
                    f"PD-ASGD: `fault_tolerant=True` needs this replica's slot: pass `replica=N` or set {REPLICA_ENV}"
                    f" (0 <= N < max_replicas={max_replicas}); a replacement for a dead replica may reuse its slot."
                )
            slot = int(value)
        if not 0 <= slot < max_replicas:
            raise ConfigurationError(
                f"PD-ASGD: replica slot {slot} is outside 0..{max_replicas - 1}: raise `max_replicas` or use a lower"
                " slot."
            )
        if timeout_s <= 0 or quorum_timeout_s <= 0:
            raise ConfigurationError("PD-ASGD: `ft_timeout` and `ft_quorum_timeout` must be positive seconds.")
        return cls(lighthouse, slot, max_replicas, timeout_s, quorum_timeout_s)


def make_manager(
    settings: FaultToleranceSettings,
    state_dict: Callable[[], Any],
    load_state_dict: Callable[[Any], None],
) -> tuple[Any, Any]:
    """A torchft ``Manager`` for a replica group of one process, with its own key-value store; and that store.

    Quorums are synchronous (``use_async_quorum=False``): a joining replica takes a healthy peer's state inside
    ``start_quorum``, before it contributes to the round. ``init_sync`` makes every replica start from the first
    quorum's primary, as DDP starts from rank 0.
    """
    torchft = require_torchft()
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=settings.timeout_s)
    manager = torchft.Manager(
        pg=torchft.ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=1,
        use_async_quorum=False,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=settings.quorum_timeout_s),
        connect_timeout=timedelta(seconds=settings.quorum_timeout_s),
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=settings.lighthouse,
        replica_id=f"pdasgd_{settings.slot}",
        hostname=socket.gethostname(),
        init_sync=True,
    )
    return manager, store


def sum_op() -> Any:
    from torch.distributed import ReduceOp

    return ReduceOp.SUM


def max_op() -> Any:
    from torch.distributed import ReduceOp

    return ReduceOp.MAX


def min_op() -> Any:
    from torch.distributed import ReduceOp

    return ReduceOp.MIN
