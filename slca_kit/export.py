"""``slca export RUN_DIR OUT_DIR``: a self-contained folder that ``load_run`` reads without the run, its data or
the Hub — weights and method state as safetensors, a JSON config, a README.md model card — optionally uploaded with
``huggingface_hub`` (docs/inference.md)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from safetensors.torch import save_file

from . import __version__
from .errors import SlcaKitError
from .inference import (EXPORT_BACKBONE, EXPORT_CONFIG, EXPORT_METHOD_STATE, EXPORT_WEIGHTS, ContinualClassifier,
                        load_run, pack_state)
from .io import read_json


def _portable_config(classifier: ContinualClassifier) -> dict:
    """The run's config without paths the export does not carry: a timm card's kwargs move into model_kwargs."""
    config = classifier.config.to_dict()
    backbone = config["backbone"]
    if backbone.get("card"):
        card = json.loads(Path(backbone["card"]).read_text(encoding="utf-8"))["config"]
        backbone["model_kwargs"] = {**card, **backbone["model_kwargs"]}
        backbone["card"] = None
    return config


def _model_card(classifier: ContinualClassifier, results: dict, original_backbone: str) -> str:
    config = classifier.config
    matrix = results.get("accuracy_matrix", [])
    rows = ["| after task | " + " | ".join(f"task {j}" for j in range(len(matrix))) + " |",
            "|---" * (len(matrix) + 1) + "|"]
    for i, row in enumerate(matrix):
        rows.append(f"| {i} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |")
    last, inc = results.get("last_acc"), results.get("inc_acc")
    summary = (f"Last-Acc **{last:.2f}**, Inc-Acc **{inc:.2f}** (class-incremental, {len(matrix)} of "
               f"{classifier.scenario.num_tasks} tasks)" if last is not None else "no accuracy recorded")
    recipe = yaml.safe_dump(results.get("config", config.to_dict()), sort_keys=False)
    provenance = json.dumps(results.get("provenance", {}), indent=2)
    return f"""---
library_name: slca_kit
tags: [continual-learning, class-incremental, vision-transformer, {config.method.name}]
---
# {config.name}: {config.method.name} on {config.data.benchmark or config.data.source}

A continual model trained with slca_kit ({config.method.name}); backbone
`{original_backbone}` ({config.backbone.source}), {classifier.seen_classes} classes over {classifier.task + 1}
tasks of sizes {list(classifier.scenario.task_sizes[:classifier.task + 1])}.

{summary}.

## Use

```python
from slca_kit import load_run
model = load_run("path/to/this/folder")
print(model.predict(["image.jpg"], top_k=5).names)
```

or `slca predict FOLDER image.jpg`.

## Accuracy matrix (%, row: after task i, column: test images of task j)

{chr(10).join(rows)}

## Recipe

```yaml
{recipe}```

## Provenance

```json
{provenance}
```
"""


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (which must not exist) from the run's latest task-end checkpoint, atomically."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise SlcaKitError(f"{out_dir}: already exists; export writes a new folder and overwrites nothing")
    classifier = load_run(run_dir, device="cpu")
    results = read_json(run_dir / "results.json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file({k: v.detach().contiguous() for k, v in classifier.model.state_dict().items()},
                  str(staging / EXPORT_WEIGHTS))
        tensors: dict = {}
        skeleton = pack_state(classifier.method.state_dict(), tensors)
        save_file(tensors, str(staging / EXPORT_METHOD_STATE))
        config = _portable_config(classifier)
        original_backbone = config["backbone"]["name"]
        if config["backbone"]["source"] == "transformers":  # its architecture; the weights are in model.safetensors
            classifier.model.backbone.model.config.save_pretrained(staging / EXPORT_BACKBONE)
        data = classifier.config.data
        meta = {
            "format": 1, "slca_kit": __version__, "config": config, "backbone": original_backbone,
            "task": classifier.task, "class_order": list(classifier.scenario.class_order),
            "task_sizes": list(classifier.scenario.task_sizes), "class_names": classifier.class_names,
            "transforms": {"test": "Resize(256/224 x size, bicubic), CenterCrop(size)", "image_size": data.image_size,
                           "mean": data.mean, "std": data.std},
            "method_state": skeleton,
        }
        (staging / EXPORT_CONFIG).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (staging / "README.md").write_text(_model_card(classifier, results, original_backbone), encoding="utf-8")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def push_to_hub(folder: str | Path, repo_id: str) -> str:
    """Upload an exported folder to a Hub model repository (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="slca_kit export")
    return f"https://huggingface.co/{repo_id}"
