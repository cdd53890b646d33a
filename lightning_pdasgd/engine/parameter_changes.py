"""Noticing that the set of trained parameters changed during fit, so the engine can follow it.

The engine builds its buckets, stashes and per-bucket optimizers from the optimizer and the module when training
starts. Lightning recipes change both mid-fit: fine-tuning unfreezes a backbone and adds a param group
(``BaseFinetuning``), ``requires_grad`` is toggled between epochs, pruning re-parametrizes ``weight`` into
``weight_orig`` and a mask (``ModelPruning``), a layer is replaced and the optimizer re-created. A plain step
simply uses whatever is there at the next ``optimizer.step()``; the engine would keep stepping what it was
built from. So before every forward it compares a cheap fingerprint of what it was built from with what is
there now, and the session rebuilds (after a drain, keeping every optimizer state) when they differ.
"""

from __future__ import annotations

from torch import nn
from torch.jit import ScriptModule
from torch.optim import Optimizer

from lightning_pdasgd.engine.parameter_buckets import ParameterBucket


class ParameterSetFingerprint:
    """What the engine was built from: the optimizer object, its param groups, each parameter's
    ``requires_grad``, and where each trained parameter lives in the module.

    ``difference`` costs a few attribute reads per parameter and says, in words, what changed.
    """

    def __init__(self, module: nn.Module, optimizer: Optimizer, buckets: list[ParameterBucket]) -> None:
        self._module = module
        self._optimizer = optimizer
        self._group_sizes = [len(group["params"]) for group in optimizer.param_groups]
        self._params = [param for group in optimizer.param_groups for param in group["params"]]
        self._trainable = [param.requires_grad for param in self._params]
        owners: dict[str, nn.Module] = {}
        self._placements: list[tuple[str, nn.Module, str, nn.Parameter]] = []
        for bucket in buckets:
            for name, param in zip(bucket.names, bucket.params):
                path, _, leaf = name.rpartition(".")
                if _inside_torchscript(module, path):
                    continue  # TorchScript holds it (the fit runs Lightning's own step): nobody re-parametrizes it
                owner = owners.setdefault(path, module.get_submodule(path))
                self._placements.append((path, owner, leaf, param))
        # every link from the module down to an owner, once: (path of the child, parent, child's name, child)
        self._links: dict[str, tuple[nn.Module, str, nn.Module]] = {}
        for path in owners:
            parent, prefix = module, ""
            for part in path.split(".") if path else ():
                prefix = f"{prefix}.{part}" if prefix else part
                child = parent.get_submodule(part)
                self._links.setdefault(prefix, (parent, part, child))
                parent = child

    def difference(self, optimizer: Optimizer) -> str | None:
        """``None`` when nothing the engine depends on changed, else what changed."""
        if optimizer is not self._optimizer:
            return "the optimizer was re-created"
        groups = optimizer.param_groups
        if len(groups) != len(self._group_sizes) or any(
            len(group["params"]) != size for group, size in zip(groups, self._group_sizes)
        ):
            return "the optimizer's param groups changed"
        for param, trainable in zip(self._params, self._trainable):
            if param.requires_grad != trainable:
                return "`requires_grad` of a parameter changed"
        for path, (parent, name, child) in self._links.items():
            if parent._modules.get(name) is not child:
                return f"module '{path}' was replaced"
        for path, owner, leaf, param in self._placements:
            if owner._parameters.get(leaf) is not param:
                return f"parameter '{path + '.' if path else ''}{leaf}' was re-parametrized or replaced"
        return None


def _inside_torchscript(module: nn.Module, path: str) -> bool:
    """Whether the submodule at ``path`` is, or sits inside, a TorchScript module."""
    parts = path.split(".") if path else []
    for depth in range(len(parts) + 1):
        if isinstance(module.get_submodule(".".join(parts[:depth])), ScriptModule):
            return True
    return False
