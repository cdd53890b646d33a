"""Where a training step's loss goes: to the engine's backward threads, or to Lightning's own backward.

Lightning's ``Strategy.backward`` runs unchanged (so ``on_before_backward`` and code that wraps or counts it see
Lightning's method); the precision plugin's ``backward`` and ``post_backward`` are routed here while a fit runs
(``_lightning_internals.route_precision_backward``). A loss whose forward ran on the engine's stash is handed off and
returns at once; ``on_after_backward`` is not called for it, because no whole-model gradient exists (a module that
needs one runs Lightning's own step: ``setup_checks.synchronous_reason``). Every other loss -- Lightning's own step,
manual optimization -- goes to the plugin's own backward.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from . import _lightning_internals, setup_checks
from .engine_calls import EngineCall


class EngineBackward:
    """The routing of one strategy's precision plugin, installed at setup and removed at teardown."""

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy
        self._handed_off = False  # the latest backward went to the engine: its post_backward calls no hook
        self._plugin: Optional[object] = None

    def install(self) -> None:
        self.remove()
        self._plugin = self._strategy.precision_plugin
        _lightning_internals.route_precision_backward(self._plugin, self._backward, self._post_backward)

    def remove(self) -> None:
        if self._plugin is not None:
            _lightning_internals.unroute_precision_backward(self._plugin)
            self._plugin = None

    def _backward(
        self, own_backward: Any, tensor: Tensor, model: Any, optimizer: Any, *args: Any, **kwargs: Any
    ) -> None:
        strategy = self._strategy
        session = strategy._session
        self._handed_off = False
        if session is None or not session.has_pending_forward:
            if session is not None:  # Lightning's own step (max_in_flight=1, the guard's or autotune's choice)
                session.watch_plain_loss(tensor, model.trainer.global_step)
            own_backward(tensor, model, optimizer, *args, **kwargs)
            return
        setup_checks.check_loss(tensor)
        with EngineCall("the hand-off of a loss"):
            # Lightning runs the closure inside `optimizer_step` only for the batch that ends an accumulation window
            session.hand_off(tensor, model.trainer.global_step, strategy.global_rank, strategy.in_optimizer_step)
        self._handed_off = True

    def _post_backward(self, own_post_backward: Any, tensor: Tensor, module: Any) -> Tensor:
        if self._handed_off:
            self._handed_off = False
            return tensor.detach()
        return own_post_backward(tensor, module)

    def __getstate__(self) -> dict[str, Any]:
        return {"_strategy": self._strategy, "_handed_off": False, "_plugin": None}
