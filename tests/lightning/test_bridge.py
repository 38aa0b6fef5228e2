"""Lightning's internals, handled in one place: the module copy ``f_0``, optimizer unwrapping."""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.core.optimizer import LightningOptimizer
from torch import Tensor, nn

from lin_probe.lightning._bridge import initial_copy, unwrap_optimizer


class _TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)
        self.trainer_ref: object | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(torch.tanh(self.body(x))))

    def on_train_start(self) -> None:
        self.trainer_ref = self.trainer  # a user-held reference, beyond Lightning's own _trainer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer_count() -> int:
    gc.collect()
    return sum(type(obj) is pl.Trainer for obj in gc.get_objects())  # type(): no proxy __class__ calls


def test_initial_copy_of_a_fitted_module_holds_no_trainer_and_is_frozen() -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
    module = _TinyModule()
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert module.trainer is trainer and module.trainer_ref is trainer
    module.train()
    module.head.eval()  # a per-submodule flag that must survive
    flags = [m.training for m in module.modules()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    count = _trainer_count()

    copied = initial_copy(module)

    assert _trainer_count() == count, "no second Trainer was deep-copied"
    assert copied._trainer is None and copied.trainer_ref is None
    assert module.trainer is trainer and module.trainer_ref is trainer
    assert [m.training for m in module.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert not copied.training and not any(p.requires_grad for p in copied.parameters())
    x = torch.randn(5, 4)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(copied(x), module(x), rtol=0, atol=0)


def test_initial_copy_drops_a_compiled_forward_that_would_run_the_live_module() -> None:
    """Lightning's ``from_compiled`` sets ``module.forward`` on the instance and marks ``_compiler_ctx``."""
    module = _TinyModule().eval()
    live = module.forward
    module.forward = lambda x: live(x)  # what a compiled, instance-level forward does: call the original
    module._compiler_ctx = {"compiled": True}
    copied = initial_copy(module)
    with torch.no_grad():
        module.head.weight.add_(1.0)  # the live module trains on
        x = torch.randn(3, 4)
        assert not torch.allclose(copied(x), module(x)), "f_0 must not follow the live module"
    assert copied._compiler_ctx is None and "forward" not in vars(copied)


def test_unwrap_optimizer() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert unwrap_optimizer(optimizer) is optimizer
    assert unwrap_optimizer(LightningOptimizer(optimizer)) is optimizer
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        unwrap_optimizer(object())
