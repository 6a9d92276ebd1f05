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


def test_the_loop_steps_the_torch_optimizer_only_where_accelerates_wrapper_adds_nothing():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from slca_kit.trainer import optimizer_to_step

    model = torch.nn.Linear(4, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = Accelerator(cpu=True)
    passing = accelerator.prepare(inner)
    assert optimizer_to_step(passing, accelerator) is inner
    scaled = AcceleratedOptimizer(inner, device_placement=False, scaler=torch.amp.GradScaler("cpu"))
    assert optimizer_to_step(scaled, accelerator) is scaled  # the scaler unscales and may skip a step

    class EngineWrapper(AcceleratedOptimizer):  # e.g. accelerate's DeepSpeed optimizer wrapper
        pass

    engine = EngineWrapper(inner, device_placement=False)
    assert optimizer_to_step(engine, accelerator) is engine


def test_stepping_the_torch_optimizer_trains_as_accelerates_wrapper_does(tiny_npz, tmp_path, monkeypatch):
    """With gradient accumulation (steps skipped between updates) and clipping, the same weights bit for bit."""
    import slca_kit.trainer as trainer_module

    train = {"gradient_accumulation_steps": 2, "grad_clip": 0.5, "epochs": 2}
    direct, expected = _run(tiny_npz, tmp_path / "direct", **train)
    monkeypatch.setattr(trainer_module, "optimizer_to_step", lambda optimizer, accelerator: optimizer)
    wrapped, results = _run(tiny_npz, tmp_path / "wrapped", **train)
    assert results["accuracy_matrix"] == expected["accuracy_matrix"]
    ours, theirs = direct.model.state_dict(), wrapped.model.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert all(p.grad is None for p in direct.model.parameters())  # cleared after each epoch
    untrained = Trainer(config_from_dict(tiny_recipe(tiny_npz, tmp_path / "untrained", method="seq_ft_sl")))
    start = untrained.model.state_dict()
    assert not all(torch.equal(ours[key], start[key]) for key in start)  # it trained
