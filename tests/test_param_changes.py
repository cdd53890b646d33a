"""Parameter-set changes during fit (issue #12), through Lightning's public API only.

Fine-tuning recipes, pruning and module surgery change which tensors a LightningModule trains while ``fit`` runs.
Plain Lightning follows because every step calls ``optimizer.step()`` on whatever the optimizer holds now. Each
test fits the same seeded model plainly and under PD-ASGD: with ``max_in_flight=1`` the weights (and the
optimizer's momentum buffers) must match plain Lightning to 1e-5; with the default settings the result must be
as good. A change the engine cannot follow must stop fit with an error naming it, never train silently wrong.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch import callbacks as cb
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_pdasgd import PDASGDStrategy
from tests.compat_helpers import MatrixNet, accuracy, fit, max_difference, snapshot

EXACT = 1e-5
ACCURACY = 0.06
# default-settings runs compare accuracies: long enough (4 x 30 steps) that stale gradients do not show in them
BATCHES_FOR_ACCURACY = 30
WAIT = 60.0


def one_in_flight() -> PDASGDStrategy:
    return PDASGDStrategy(max_in_flight=1, wait_timeout=WAIT)


def default() -> PDASGDStrategy:
    return PDASGDStrategy(wait_timeout=WAIT)


def initial(model_factory: Any = MatrixNet) -> dict[str, torch.Tensor]:
    """The initial weights of every run: ``fit`` seeds with 7 before it builds the model."""
    L.seed_everything(7, verbose=False)
    return snapshot(model_factory())


def momentum_buffers(trainer: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The user optimizer's momentum buffers, keyed by parameter name (what a checkpoint would hold)."""
    optimizer = trainer.optimizers[0]
    return {
        name: optimizer.state[param]["momentum_buffer"].detach().clone()
        for name, param in module.named_parameters()
        if param in optimizer.state and optimizer.state[param].get("momentum_buffer") is not None
    }


class UnfreezeBackboneAt(cb.BaseFinetuning):
    """Lightning's documented fine-tuning recipe: backbone frozen, then unfrozen into a new param group."""

    def __init__(self, epoch: int = 1, lr: float = 0.05) -> None:
        super().__init__()
        self.epoch, self.lr = epoch, lr

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module: Any, current_epoch: int, optimizer: Any) -> None:
        if current_epoch == self.epoch:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=self.lr)


# ------------------------------------------------------------------------------------------- fine-tuning

def test_unfreeze_and_add_param_group_matches_plain() -> None:
    start = initial()
    plain, plain_trainer = fit("auto", callbacks=[UnfreezeBackboneAt()])
    pdasgd, pdasgd_trainer = fit(one_in_flight(), callbacks=[UnfreezeBackboneAt()])

    weight = "backbone.0.weight"
    moved = (snapshot(pdasgd)[weight] - start[weight]).abs().max().item()
    plain_moved = (snapshot(plain)[weight] - start[weight]).abs().max().item()
    assert plain_moved > 1e-3, "the recipe must train the backbone in the plain run"
    assert moved > 1e-3, f"the unfrozen backbone never changed under pdasgd (max change {moved}, plain {plain_moved})"
    assert max_difference(snapshot(plain), snapshot(pdasgd)) <= EXACT
    assert len(pdasgd_trainer.optimizers[0].param_groups) == len(plain_trainer.optimizers[0].param_groups) == 2
    assert max_difference(momentum_buffers(plain_trainer, plain), momentum_buffers(pdasgd_trainer, pdasgd)) <= EXACT



def test_backbone_finetuning_trains_the_backbone_with_default_settings() -> None:
    def run(strategy: Any) -> tuple[float, float]:
        start = initial()
        finetuning = cb.BackboneFinetuning(unfreeze_backbone_at_epoch=1)
        model, _ = fit(strategy, callbacks=[finetuning], epochs=4, batches=BATCHES_FOR_ACCURACY)
        return (snapshot(model)["backbone.0.weight"] - start["backbone.0.weight"]).abs().max().item(), accuracy(model)

    plain_moved, plain_accuracy = run("auto")
    moved, pdasgd_accuracy = run(default())
    assert moved >= 0.5 * plain_moved, f"backbone moved {moved} under pdasgd, {plain_moved} plain"
    assert pdasgd_accuracy >= plain_accuracy - ACCURACY


# ------------------------------------------------------------------------------------------- requires_grad toggles
class FreezeHeadForEpoch1(MatrixNet):
    """The head stops training for epoch 1 only (``requires_grad`` toggled in ``on_train_epoch_start``)."""

    def on_train_epoch_start(self) -> None:
        self.head.requires_grad_(self.current_epoch != 1)

    def on_train_epoch_end(self) -> None:
        self.seen = getattr(self, "seen", [])
        self.seen.append(self.head.weight.detach().clone())



def test_requires_grad_switched_off_and_on_between_epochs() -> None:
    plain, _ = fit("auto", model_factory=FreezeHeadForEpoch1)
    pdasgd, _ = fit(one_in_flight(), model_factory=FreezeHeadForEpoch1)

    frozen_change = (pdasgd.seen[1] - pdasgd.seen[0]).abs().max().item()
    assert frozen_change == 0.0, f"the frozen head changed by {frozen_change} during its frozen epoch"
    assert (pdasgd.seen[2] - pdasgd.seen[1]).abs().max().item() > 1e-4, "the head trains again after unfreezing"
    assert max_difference(snapshot(plain), snapshot(pdasgd)) <= EXACT


class UnfreezeHeadAtEpoch1(MatrixNet):
    """The head starts frozen (still in the optimizer: ``requires_grad`` alone decides) and trains from epoch 1."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def on_fit_start(self) -> None:
        self.head.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.head.requires_grad_(True)



def test_requires_grad_switched_on_after_start() -> None:
    start = initial(UnfreezeHeadAtEpoch1)
    plain, _ = fit("auto", model_factory=UnfreezeHeadAtEpoch1)
    pdasgd, _ = fit(one_in_flight(), model_factory=UnfreezeHeadAtEpoch1)
    moved = (snapshot(pdasgd)["head.weight"] - start["head.weight"]).abs().max().item()
    assert moved > 1e-3, f"the head unfrozen at epoch 1 never changed under pdasgd (max change {moved})"
    assert max_difference(snapshot(plain), snapshot(pdasgd)) <= EXACT


# ------------------------------------------------------------------------------------------- pruning
def _pruned_fit(strategy: Any, batches: int = 10) -> tuple[nn.Module, float]:
    pruning = cb.ModelPruning("l1_unstructured", amount=0.3, verbose=0)
    model, _ = fit(strategy, callbacks=[pruning], epochs=4, batches=batches)
    weights = [model.backbone[0].weight, model.head.weight]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return model, zeros



def test_model_pruning_matches_plain_with_one_in_flight() -> None:
    plain, plain_zeros = _pruned_fit("auto")
    pdasgd, pdasgd_zeros = _pruned_fit(one_in_flight())
    assert plain_zeros > 0.5, "4 rounds of 30% pruning leave most weights at zero"
    assert pdasgd_zeros == plain_zeros
    assert max_difference(snapshot(plain), snapshot(pdasgd)) <= EXACT



def test_model_pruning_accuracy_near_plain_with_default_settings() -> None:
    plain, plain_zeros = _pruned_fit("auto", BATCHES_FOR_ACCURACY)
    pdasgd, pdasgd_zeros = _pruned_fit(default(), BATCHES_FOR_ACCURACY)
    assert abs(pdasgd_zeros - plain_zeros) < 0.02
    assert accuracy(pdasgd) >= accuracy(plain) - ACCURACY, (accuracy(pdasgd), accuracy(plain))


def test_a_lottery_ticket_reset_is_not_taken_for_a_blow_up() -> None:
    """`ModelPruning` resets the weights to their initial values when it first prunes (lottery ticket) and renames
    them (`weight` -> `weight_orig`): the loss jumps back to where it started. The divergence guard starts over
    with the new parameter set instead of restoring a state of the old one."""
    strategy = default()
    _pruned_fit(strategy, BATCHES_FOR_ACCURACY)
    assert strategy.stats.guard_trips == 0


class KeepsAnAliasOfTheHead(MatrixNet):
    """At the end of epoch 0 the head's weight is pointed at a tensor the module keeps (``param.data = kept``, as
    the lottery-ticket reset of ``ModelPruning`` does): plain steps write into ``kept`` from then on."""

    def on_train_epoch_end(self) -> None:
        if self.current_epoch == 0:
            self.kept = self.head.weight.detach().clone()
            self.kept_at_start = self.kept.clone()
            self.head.weight.data = self.kept


def test_a_storage_given_from_outside_keeps_receiving_the_updates() -> None:
    """Copy-on-write must not move a parameter away from a storage that outside code gave it and still holds: the
    updates of every later step land in it, with several losses in flight as with plain Lightning."""
    model, _ = fit(default(), model_factory=KeepsAnAliasOfTheHead)
    assert model.head.weight.data_ptr() == model.kept.data_ptr()
    assert not torch.equal(model.kept, model.kept_at_start), "the head trained on after the storage was given"


# ------------------------------------------------------------------------------------------- module surgery
class NewHeadAtEpoch1(MatrixNet):
    """At epoch 1 the head is replaced by a fresh ``nn.Linear`` and the optimizer is re-created for it."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            torch.manual_seed(11)
            self.head = nn.Linear(self.head.in_features, 10)
            self.trainer.strategy.setup_optimizers(self.trainer)



def test_layer_replaced_and_optimizer_recreated() -> None:
    plain, _plain_trainer = fit("auto", model_factory=NewHeadAtEpoch1)
    pdasgd, _pdasgd_trainer = fit(one_in_flight(), model_factory=NewHeadAtEpoch1)
    torch.manual_seed(11)
    fresh_head = nn.Linear(32, 10).weight.detach()
    assert (pdasgd.head.weight.detach() - fresh_head).abs().max().item() > 1e-3, "the new head must train"
    assert max_difference(snapshot(plain), snapshot(pdasgd)) <= EXACT
    assert accuracy(pdasgd) == accuracy(plain)


class NewHeadIntoParamGroup(MatrixNet):
    """At epoch 1 the head is replaced and its parameters are added to the existing optimizer as a new group:
    the backbone's momentum buffers must carry on (the optimizer's state is kept across the change)."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.backbone_momentum_before = momentum_buffers(self.trainer, self)["backbone.0.weight"]
            torch.manual_seed(11)
            self.head = nn.Linear(self.head.in_features, 10)
            self.trainer.optimizers[0].add_param_group({"params": list(self.head.parameters()), "lr": 0.05})



def test_layer_replaced_into_new_param_group_keeps_momentum() -> None:
    plain, plain_trainer = fit("auto", model_factory=NewHeadIntoParamGroup)
    pdasgd, pdasgd_trainer = fit(one_in_flight(), model_factory=NewHeadIntoParamGroup)
    # the momentum carried into the change is the same, and is still there afterwards
    assert max_difference({"m": plain.backbone_momentum_before}, {"m": pdasgd.backbone_momentum_before}) <= EXACT
    plain_buffers, pdasgd_buffers = momentum_buffers(plain_trainer, plain), momentum_buffers(pdasgd_trainer, pdasgd)
    assert (
        sorted(pdasgd_buffers)
        == sorted(plain_buffers)
        == ["backbone.0.bias", "backbone.0.weight", "head.bias", "head.weight"]
    )
    assert max_difference(plain_buffers, pdasgd_buffers) <= EXACT
    assert max_difference(snapshot(plain), snapshot(pdasgd)) <= EXACT


def test_momentum_buffers_survive_a_validation_and_epoch_boundary() -> None:
    """The baseline the tests above build on: without any change, the user optimizer's momentum buffers after
    fit are the plain run's (they live in the user's optimizer, across drains at validation and epoch ends)."""
    plain, plain_trainer = fit("auto")
    pdasgd, pdasgd_trainer = fit(one_in_flight())
    plain_buffers, pdasgd_buffers = momentum_buffers(plain_trainer, plain), momentum_buffers(pdasgd_trainer, pdasgd)
    assert len(plain_buffers) == 4
    assert max_difference(plain_buffers, pdasgd_buffers) <= EXACT


# ------------------------------------------------------------------------------------------- changes it cannot follow
class SwitchesToLBFGS(MatrixNet):
    """At epoch 1 the optimizer is re-created as LBFGS, which PD-ASGD refuses at setup (it needs a closure)."""

    def configure_optimizers(self) -> Any:
        trainer = self._trainer
        if trainer is not None and trainer.current_epoch >= 1:
            return torch.optim.LBFGS(self.parameters(), lr=0.1)
        return super().configure_optimizers()

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.trainer.strategy.setup_optimizers(self.trainer)


def test_lbfgs_switch_trains_plainly() -> None:
    """The plain half of the next test: the switch itself is valid Lightning, so a refusal is PD-ASGD's."""
    _model, trainer = fit("auto", model_factory=SwitchesToLBFGS)
    assert isinstance(trainer.optimizers[0], torch.optim.LBFGS)
    assert trainer.current_epoch == 3


def test_optimizer_switched_to_one_it_cannot_run_is_refused_by_name() -> None:
    with pytest.raises(MisconfigurationException, match="LBFGS"):
        fit(one_in_flight(), model_factory=SwitchesToLBFGS)
