"""The accelerator fast path's switches give the plain path's results on CPU: ``train.optimizer_impl`` (foreach and
fused torch.optim kernels) and ``train.compile_backend`` (torch.compile of the backbone)."""
from __future__ import annotations

import pytest
import torch

from slca_kit.config import TrainConfig
from slca_kit.errors import ConfigError
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer, build_optimizer

from conftest import tiny_recipe


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_foreach_and_fused_optimizers_take_the_default_steps(optimizer, impl):
    def trained(kind):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        groups = [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "lr": 0.1}]
        step = build_optimizer(groups, TrainConfig(optimizer=optimizer, optimizer_impl=kind, weight_decay=1e-3))
        inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(inputs), torch.arange(16) % 3)
            step.zero_grad()
            loss.backward()
            step.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.allclose(trained(impl), trained("default"), atol=1e-6)


def _run(tiny_npz, folder, **train):
    recipe = tiny_recipe(tiny_npz, folder, method="seq_ft_sl")
    recipe["train"].update({"epochs": 1, **train})
    trainer = Trainer(config_from_dict(recipe))
    return trainer, trainer.run()


def test_a_compiled_backbone_trains_to_the_same_model(tiny_npz, tmp_path):
    plain, expected = _run(tiny_npz, tmp_path / "plain")
    compiled, results = _run(tiny_npz, tmp_path / "compiled", compile_backend="eager")
    assert results["accuracy_matrix"] == expected["accuracy_matrix"]
    ours, theirs = compiled.model.state_dict(), plain.model.state_dict()
    assert ours.keys() == theirs.keys()  # compiled in place: checkpoints keep their keys
    assert all(torch.allclose(ours[key], theirs[key], atol=1e-6) for key in ours)


def test_an_unknown_compile_backend_or_optimizer_impl_is_refused(tiny_npz, tmp_path):
    with pytest.raises(ConfigError, match="train.compile_backend: 'fast' is not a torch.compile backend"):
        _run(tiny_npz, tmp_path, compile_backend="fast")
    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        _run(tiny_npz, tmp_path, optimizer_impl="turbo")
