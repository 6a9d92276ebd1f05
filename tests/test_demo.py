"""The embedded default job: glyph rendering and pretraining (slca_kit/glyphs.py), the cache, and `slca train` with
no recipe running slca, seq_ft_sl and seq_ft side by side (slca_kit/demo.py)."""
from __future__ import annotations

import io
import json
import math
import string
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from slca_kit import cli, glyphs
from slca_kit.config import BackboneConfig
from slca_kit.models import create_backbone

TINY = glyphs.GlyphPretraining(per_class=3, epochs=1, batch_size=64)


def test_glyphs_exclude_digits_and_fonts_are_installed():
    assert not set(glyphs.GLYPHS) & set(string.digits) and len(set(glyphs.GLYPHS)) == len(glyphs.GLYPHS) == 79
    assert set(glyphs.HELD_OUT_FONTS) < set(glyphs.FONT_FILES)
    assert all(glyphs.font_path(font).is_file() for font in glyphs.FONT_FILES)


def test_render_is_seeded_bright_on_dark_and_differs_by_glyph():
    first = glyphs.render("A", "DejaVuSans.ttf", np.random.RandomState(3))
    again = glyphs.render("A", "DejaVuSans.ttf", np.random.RandomState(3))
    other = glyphs.render("o", "DejaVuSans.ttf", np.random.RandomState(3))
    assert first.shape == (32, 32) and first.dtype == np.uint8 and np.array_equal(first, again)
    assert not np.array_equal(first, other)
    # strokes are bright and the ground dark, as in the digits: border pixels are darker than the brightest
    border = np.concatenate([first[0], first[-1], first[:, 0], first[:, -1]])
    assert first.max() > 100 and border.mean() < first.max() / 2


def test_make_set_labels_every_glyph_and_cycles_fonts():
    images, labels = glyphs.make_set(("DejaVuSans.ttf", "cmr10.ttf"), per_class=2, seed=0)
    assert images.shape == (2 * 79, 32, 32) and np.array_equal(labels, np.repeat(np.arange(79), 2))
    inputs = glyphs.to_inputs(images[:3])
    assert inputs.shape == (3, 3, 32, 32) and torch.equal(inputs[:, 0], inputs[:, 2])
    assert inputs.min() >= -1 and inputs.max() <= 1  # mean = std = 0.5, the digits preset


def test_pretraining_learns_and_its_file_loads_as_the_demo_backbone(tmp_path):
    settings = glyphs.GlyphPretraining(per_class=16, epochs=3, batch_size=64, lr=3e-3)
    state, card = glyphs.pretrain(settings, progress=False)
    losses = [entry["loss"] for entry in card["log"]]
    assert len(losses) == 3 and losses[-1] < losses[0] < math.log(79) + 0.3  # starts near chance, then learns
    assert card["held_out_font_accuracy"] == card["log"][-1]["held_out_font_accuracy"]
    assert card["chance_accuracy"] == round(100 / 79, 2) and card["settings"]["per_class"] == 16
    weights = glyphs.save(state, card, tmp_path)
    assert weights == tmp_path / "glyph_vit_v1.safetensors" and json.loads(weights.with_suffix(".json").read_text())
    assert all(torch.equal(load_file(weights)[key], value) for key, value in state.items())
    # through the recipe keys the demo uses: the card supplies the architecture, the file the weights
    # (the reference's fresh final LayerNorm, which the demo keeps as SLCA does, is left out of the comparison)
    model = create_backbone(BackboneConfig(name=glyphs.TIMM_NAME, weights=str(weights),
                                           card=str(weights.with_suffix(".json")), replace_final_norm=False))
    reference = timm.create_model(glyphs.TIMM_NAME, num_classes=0, **glyphs.VIT_KWARGS)
    reference.load_state_dict(state)
    x = glyphs.to_inputs(glyphs.make_set(("cmr10.ttf",), 1, seed=5)[0][:4])
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-6)


def test_the_cache_is_made_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLCA_KIT_CACHE", str(tmp_path / "cache"))
    calls = []
    real_pretrain = glyphs.pretrain

    def tiny_pretrain(settings, progress=True):
        calls.append(settings)
        return real_pretrain(TINY, progress=False)

    monkeypatch.setattr(glyphs, "pretrain", tiny_pretrain)
    weights, card = glyphs.ensure_demo_backbone(progress=False)
    assert weights == tmp_path / "cache" / "glyph_vit_v1.safetensors" and weights.is_file()
    assert calls == [glyphs.GlyphPretraining()]  # the documented defaults make the cache
    again, card_again = glyphs.ensure_demo_backbone(progress=False)
    assert again == weights and card_again == card and len(calls) == 1


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    state, card = glyphs.pretrain(TINY, progress=False)
    glyphs.save(state, card, cache)
    monkeypatch.setenv("SLCA_KIT_CACHE", str(cache))
    return card


def test_default_job_runs_three_methods_side_by_side_then_reuses_them(tiny_cache, tmp_path):
    runs = tmp_path / "runs"
    quick = ["train.epochs=1", "data.max_train_per_class=12"]  # a short run: the point is the side-by-side output
    status, out, err = run_cli(["train", *quick, f"output_dir={runs}"])
    assert status == 0, err
    results = {m: json.loads((runs / m / "results.json").read_text()) for m in ("slca", "seq_ft_sl", "seq_ft")}
    assert all(r["complete"] and len(r["accuracy_matrix"]) == 5 for r in results.values())
    assert {r["config"]["backbone"]["weights"] for r in results.values()} == {
        str(tmp_path / "cache" / "glyph_vit_v1.safetensors")}
    for method, r in results.items():  # the printed table carries each run's own numbers
        assert (f"| {method} | {r['last_acc']:.2f} | {r['inc_acc']:.2f} | {r['forgetting']:.2f} | "
                f"{r['accuracy_matrix'][-1][0]:.2f} |") in out
    assert f"{tiny_cache['held_out_font_accuracy']:.1f}% on fonts it never saw" in out
    for name in ("comparison_curve.png", "comparison.md", "comparison.html"):
        assert (runs / name).is_file()
    status, again, _ = run_cli(["train", *quick, f"output_dir={runs}"])
    assert status == 0 and again.count(", reused") == 3 and again.split("Backbone:")[1] == out.split("Backbone:")[1]
    status, _, err = run_cli(["train", "train.epochs=2", quick[1], f"output_dir={runs}"])
    assert status == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    assert f"{runs / 'slca'} holds a demo run with other settings (train.epochs)" in err


def test_default_job_refuses_seeds_and_pretrain_glyphs_refuses_bad_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SLCA_KIT_CACHE", str(tmp_path))
    status, _, err = run_cli(["train", "--seeds", "1", "2"])
    assert status == 2 and "error: --seeds: name a recipe" in err
    status, _, err = run_cli(["pretrain-glyphs", "--epochs", "0"])
    assert status == 2 and err.startswith("error: pretrain-glyphs: --per-class, --epochs and --batch-size must be")
    assert not list(tmp_path.iterdir())  # nothing made


def test_pretrain_glyphs_command_writes_weights_and_card(tmp_path):
    status, out, err = run_cli(["pretrain-glyphs", "--per-class", "2", "--epochs", "1", "--output", str(tmp_path)])
    card = json.loads((tmp_path / "glyph_vit_v1.json").read_text())
    assert status == 0, err
    assert f"held-out-font accuracy {card['held_out_font_accuracy']}%" in out
    assert card["settings"] == {"per_class": 2, "epochs": 1, "batch_size": 256, "lr": 3e-3, "weight_decay": 0.05,
                                "seed": 0}
    assert card["command"] == ("slca pretrain-glyphs --per-class 2 --epochs 1 --batch-size 256 --lr 0.003 "
                               "--weight-decay 0.05 --seed 0")
