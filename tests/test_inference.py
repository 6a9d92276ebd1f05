"""Using a trained model: load_run + predict give the trainer's own evaluation, an export is self-contained and
gives the same logits, the CLI's predict / export, bad input, and the Hub upload (mocked)."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from slca_kit import load_run
from slca_kit.errors import CheckpointError, DataError, SlcaKitError
from slca_kit.export import export_run, push_to_hub
from slca_kit.inference import pack_state, unpack_state
from slca_kit.methods import METHODS
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer

from conftest import run_cli_here, tiny_recipe, write_recipe

NEEDS = {"slca_pp": {"adapter": {"type": "lora", "r": 4, "lora_alpha": 3.2, "train_backbone": ["norm", "bias"]}}}
PARAMS = {"dualprompt": {"g_layers": [0], "e_layers": [1], "e_pool_size": 3},
          "coda_prompt": {"pool_size": 6, "length": 4, "layers": [0, 1]}, "packnet": {"retrain_epochs": 1},
          # M 10000: 17 solves of 10000 x 10000 a task; the first-session modules not covered by resume tests
          "ranpac": {"projection_dim": 64, "first_session": "vpt_deep"}, "aper": {"first_session": "ssf"},
          "hide_prompt": {"e_layers": [0, 1], "centroids": 3, "ca_epochs": 2, "tii_epochs": 2}}


def _train(npz, tmp_path, method, **sections):
    recipe = tiny_recipe(npz, tmp_path, method=method, **{**NEEDS.get(method, {}), **sections})
    recipe["method"]["params"] = PARAMS.get(method, {})
    recipe["train"]["epochs"] = 1
    return Trainer(config_from_dict(recipe)).run(), tmp_path / f"tiny_{method}"


def _test_set(npz):
    with np.load(npz) as arrays:
        return arrays["test_x"], arrays["test_y"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_predict_is_the_runs_evaluation_and_an_export_gives_the_same_logits(tiny_npz, tmp_path, method):
    results, run_dir = _train(tiny_npz, tmp_path, method)
    model = load_run(run_dir, device="cpu")
    images, labels = _test_set(tiny_npz)
    assert model.task == 2 and model.seen_classes == 6
    if model.method.evaluation_batch() is None:  # per-image methods: the evaluation's counts exactly
        predicted = np.array(model.predict(list(images)).indices)[:, 0]
        order = list(results["class_order"])
        task_of = {cls: order.index(cls) // 2 for cls in order}  # 3 tasks of 2 classes
        correct = [int(((predicted == labels) & (np.vectorize(task_of.get)(labels) == t)).sum()) for t in range(3)]
        assert correct == results["correct"][-1]
    exported = export_run(run_dir, tmp_path / "export")
    reference = model.logits(list(images))
    shutil.rmtree(run_dir)  # the export stands alone
    again = load_run(exported, device="cpu")
    assert torch.equal(again.logits(list(images)), reference)
    assert again.class_names == [f"class_{i}" for i in range(6)]


def test_predictions_map_to_the_datasets_ids_and_names_with_softmax_scores(tiny_npz, tmp_path):
    _, run_dir = _train(tiny_npz, tmp_path, "seq_ft_sl")
    model = load_run(run_dir, device="cpu")
    images, _ = _test_set(tiny_npz)
    logits = model.logits(list(images[:4]))
    predictions = model.predict(list(images[:4]), top_k=3)
    probabilities = logits.softmax(dim=1)
    for row, indices, names, scores in zip(probabilities, predictions.indices, predictions.names,
                                           predictions.scores):
        best = row.topk(3)
        assert indices == [model.scenario.class_order[c] for c in best.indices.tolist()]
        assert names == [f"class_{i}" for i in indices] and scores == pytest.approx(best.values.tolist())
    # one image, a file, a PIL image and an array give the same answer
    path = tmp_path / "one.png"
    Image.fromarray(images[0]).save(path)
    single = [model.predict(x).indices for x in (path, str(path), Image.open(path), images[0])]
    assert single[0] == single[1] == single[2] == single[3] == [predictions.indices[0][:1]]


def test_the_model_card_and_config_describe_the_run(tiny_npz, tmp_path):
    results, run_dir = _train(tiny_npz, tmp_path, "slca")
    folder = export_run(run_dir, tmp_path / "card")
    card = (folder / "README.md").read_text()
    assert f"Last-Acc **{results['last_acc']:.2f}**" in card and f"Inc-Acc **{results['inc_acc']:.2f}**" in card
    assert "| after task | task 0 | task 1 | task 2 |" in card and '"git_commit"' in card
    meta = json.loads((folder / "slca_config.json").read_text())
    assert meta["backbone"] == "vit_tiny_patch16_224" and meta["task_sizes"] == [2, 2, 2]
    assert meta["transforms"]["image_size"] == 32 and meta["config"]["backbone"]["pretrained"] is False
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "method_state.safetensors", "model.safetensors",
                                                       "slca_config.json"]


def test_a_transformers_run_exports_and_predicts_without_its_checkpoint_folder(tiny_npz, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = tmp_path / "hf_vit"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(hf)
    backbone = {"source": "transformers", "name": str(hf), "model_kwargs": {}}
    _, run_dir = _train(tiny_npz, tmp_path, "slca", backbone=backbone)
    images, _ = _test_set(tiny_npz)
    reference = load_run(run_dir, device="cpu").logits(list(images))
    folder = export_run(run_dir, tmp_path / "hf_export")
    shutil.rmtree(hf)
    shutil.rmtree(run_dir)
    assert torch.equal(load_run(folder, device="cpu").logits(list(images)), reference)
    assert (folder / "backbone" / "config.json").is_file()


def test_method_state_round_trips_through_json_and_safetensors():
    state = {"means": torch.arange(6.0).reshape(2, 3), "owner": {"w": torch.ones(2, dtype=torch.int16)},
             "history": [{"task": 0, "sizes": (3, 4)}, {"task": 1, "sizes": (5,)}], 7: None, "loss": [0.5, 0.25]}
    tensors = {}
    skeleton = json.loads(json.dumps(pack_state(state, tensors)))
    restored = unpack_state(skeleton, tensors)
    assert restored.keys() == state.keys() and restored[7] is None and restored["history"] == state["history"]
    assert torch.equal(restored["means"], state["means"]) and restored["owner"]["w"].dtype == torch.int16
    with pytest.raises(SlcaKitError, match=r"export: the method state at state.f is a function"):
        pack_state({"f": lambda: 0}, {})


def _slca(*args, cwd):
    import subprocess

    return subprocess.run([sys.executable, "-m", "slca_kit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_predict_and_export_and_their_errors(tiny_npz, tmp_path):
    recipe = tiny_recipe(tiny_npz, tmp_path / "runs", method="seq_ft_sl")
    recipe["train"]["epochs"] = 1
    path = write_recipe(tmp_path / "r.yaml", recipe)
    images, _ = _test_set(tiny_npz)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    empty = run_cli_here("predict", str(tmp_path / "runs" / "tiny_seq_ft_sl"), str(folder))
    assert empty.returncode == 2 and empty.stderr.startswith("error: ") and "Traceback" not in empty.stderr
    assert _slca("train", str(path), cwd=tmp_path).returncode == 0
    run_dir = str(tmp_path / "runs" / "tiny_seq_ft_sl")
    done = _slca("predict", run_dir, str(folder), "--top-k", "2", "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.count("class_") == 2 for line in lines)
    assert lines[0].startswith(f"{folder / '0.png'}: class_")
    bad = run_cli_here("predict", run_dir, str(tmp_path / "broken.png"))
    assert bad.returncode == 2 and "broken.png: cannot read it as an image" in bad.stderr
    assert bad.stderr.count("\n") == 1
    first = run_cli_here("export", run_dir, str(tmp_path / "out"))
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    second = run_cli_here("export", run_dir, str(tmp_path / "out"))
    assert second.returncode == 2 and "already exists; export writes a new folder" in second.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    from_export = run_cli_here("predict", str(tmp_path / "out"), str(folder), "--top-k", "2")
    assert from_export.stdout == done.stdout


def test_no_complete_checkpoint_is_one_error(tiny_npz, tmp_path):
    run_dir = tmp_path / "started"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}")
    (run_dir / "results.json").write_text(json.dumps({"class_order": [0, 1], "task_sizes": [2]}))
    with pytest.raises(CheckpointError, match=r"no complete task checkpoint"):
        load_run(run_dir)
    with pytest.raises(SlcaKitError, match=r"neither a run folder"):
        load_run(tmp_path / "nothing")
    with pytest.raises(DataError, match=r"no image files"):
        from slca_kit.inference import image_files

        image_files([tmp_path])


def test_push_to_hub_creates_the_repository_and_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kwargs: calls.append(("create", repo_id, kwargs)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kwargs: calls.append(("upload", kwargs["repo_id"], kwargs["folder_path"])))
    assert push_to_hub(tmp_path, "me/slca-model") == "https://huggingface.co/me/slca-model"
    assert calls == [("create", "me/slca-model", {"repo_type": "model", "exist_ok": True}),
                     ("upload", "me/slca-model", str(tmp_path))]
