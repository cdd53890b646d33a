"""One process per device, launched the way ``strategy="ddp"`` launches them, with a second process group.

Lightning re-runs the user's script once per local device (or uses the processes torchrun or SLURM started), and
every rank joins the default process group through Lightning's own initialisation. PD-ASGD's exchange thread gets
a process group of its own (the *background group*), so its collectives never interleave with the loop thread's
(``sync_dist`` logging, barriers, checkpoint broadcasts) on one communicator.
"""

from __future__ import annotations

import atexit
from datetime import timedelta
from typing import Any, Optional

import torch
from typing_extensions import override

from lightning_pdasgd import _flavor

from . import _lightning_internals
from ._lightning import (
    Accelerator,
    CheckpointIO,
    ClusterEnvironment,
    MisconfigurationException,
    ParallelStrategy,
    Precision,
    default_pg_timeout,
)


class OneProcessPerDeviceLauncher(_lightning_internals.subprocess_script_launcher_class()):  # type: ignore[misc]
    """Lightning's script launcher (what ``strategy="ddp"`` uses), as a class of ours.

    With both Lightning packages imported it is registered as a virtual subclass of the other package's launcher
    too, so either Trainer recognises it and kills the child processes on Ctrl-C (``_flavor.py``).
    """


class OneProcessPerDevice(ParallelStrategy):
    """A ``ParallelStrategy`` with one process per device and a background process group for a helper thread."""

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        background_group_timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._background_group_timeout = background_group_timeout
        self._background_group: Any = None
        self._world_size_set: Optional[int] = None  # `strategy.world_size = n` (see `world_size`)
        self._fit_root_device: Optional[torch.device] = None  # from `setup_environment` to `teardown`

    @property
    def background_group(self) -> Any:
        """The process group of the background thread (``None`` on one device)."""
        return self._background_group

    @property
    @override
    def root_device(self) -> torch.device:
        """This process's device; read once per run (``local_rank`` reads the environment, and Lightning asks at
        every batch)."""
        if self._fit_root_device is not None:
            return self._fit_root_device
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    @override
    def world_size(self) -> int:
        """The world size Lightning sees: the processes of the run, unless set by hand (``strategy.world_size = n``).

        Lightning's ``SingleDeviceStrategy`` keeps ``world_size`` as a plain attribute, and Lightning's own tests set
        it to make a one-process run look distributed (``trainer.world_size``). Here too, on one process: the
        Trainer, the loops and the callbacks see the value set; process groups, the exchange and batch claiming
        follow the processes that really run (``process_count``).
        """
        return self._world_size_set if self._world_size_set is not None else self.process_count

    @world_size.setter
    def world_size(self, world_size: int) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"`strategy.world_size` must be a positive int, got {world_size!r}.")
        self._world_size_set = world_size

    @property
    def process_count(self) -> int:
        """The processes that run this fit (the cluster environment's count: devices x nodes once launched)."""
        return self.cluster_environment.world_size() if self.cluster_environment is not None else 1

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        return self.num_nodes * self.num_processes > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.num_nodes * self.num_processes > 1:
            self._launcher = OneProcessPerDeviceLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.set_world_ranks()
        self._check_world_size_set()
        self._fit_root_device = None
        self._fit_root_device = self.root_device
        if self.process_count > 1:
            self._process_group_backend, self._background_group = _lightning_internals.init_process_groups(
                self.cluster_environment,
                self._process_group_backend,
                self.root_device,
                self._timeout,
                self._background_group_timeout,
            )
            destroy_process_groups_at_exit()

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)

    def _check_world_size_set(self) -> None:
        """A world size set by hand may only simulate ranks in a one-process run; several processes need the truth."""
        count = self.process_count
        if self._world_size_set is not None and count > 1 and self._world_size_set != count:
            raise MisconfigurationException(
                f"`strategy.world_size` was set to {self._world_size_set}, but this run has {count} processes"
                " (devices x num_nodes). The world size of a multi-process run is set by"
                " `Trainer(devices=..., num_nodes=...)`: remove the assignment."
            )

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # without a process group there is no other rank to agree with; Lightning's arithmetic would compare this
        # rank's vote with a world size set by hand (`world_size`) and turn every `all=True` decision into False
        if not _lightning_internals.distributed_is_initialized():
            return decision
        return super().reduce_boolean_decision(decision, all=all)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    @override
    def teardown(self) -> None:
        self._fit_root_device = None
        super().teardown()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_background_group"] = None  # a process group does not pickle; each process makes its own
        state["_fit_root_device"] = None  # each process reads its own
        return state


_exit_hook_registered = False


def destroy_process_groups_at_exit() -> None:
    """Destroy every process group when the program exits, while the interpreter still runs (once per process).

    Otherwise gloo's worker threads may free the last collective's tensors during interpreter finalisation, where
    taking the GIL ends the thread inside a C++ destructor: the process aborts after a successful run ("terminate
    called without an active exception", exit code 134; reproduced on torch 2.14.1 in 2-rank CPU runs, about one in
    six: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``THPVariable_dealloc`` -> ``take_gil`` ->
    ``pthread_exit``). Destroying them first is what torch recommends before exit; nothing happens if the program
    destroyed them itself.
    """
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    _exit_hook_registered = True
    atexit.register(_destroy_process_groups)


def _destroy_process_groups() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_acceptable_to(trainer_flavor: _flavor.Flavor) -> None:
    """Let the other Lightning package's Trainer accept this flavour's strategy and launcher (``_flavor.py``)."""
    _lightning_internals.register_virtual_subclasses(trainer_flavor, OneProcessPerDevice, OneProcessPerDeviceLauncher)
