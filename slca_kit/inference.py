"""Use a trained continual model: ``load_run`` rebuilds it from a run folder (its latest task-end checkpoint) or from
an exported folder, and ``predict`` classifies images the way the method evaluates (SLCA's aligned heads, prototypes,
task routing, ...). ``export_run`` writes the self-contained folder (docs/inference.md)."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file

from . import checkpoint as ckpt
from .config import Config
from .data.scenario import Scenario
from .data.transforms import build_transforms
from .errors import CheckpointError, DataError, SlcaKitError
from .io import read_json
from .methods import TaskContext, build_method
from .models import build_model

EXPORT_CONFIG = "slca_config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_METHOD_STATE = "method_state.safetensors"
EXPORT_BACKBONE = "backbone"  # a transformers backbone's config.json (its weights are in model.safetensors)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class Predictions:
    """Per image, the top-k classes (the dataset's own label ids and names) with their softmax scores over all
    seen classes, best first."""

    indices: list[list[int]]
    names: list[list[str]]
    scores: list[list[float]]


class ContinualClassifier:
    """A continual model after its last finished task, with its method's inference state."""

    def __init__(self, config: Config, model, method, scenario: Scenario, task: int, class_names: list[str],
                 source: Path):
        self.config, self.model, self.method, self.scenario = config, model, method, scenario
        self.task, self.class_names, self.source = task, class_names, source
        self.transform = build_transforms(config.data)[1]  # the test transform the run evaluated with
        self.device = torch.device("cpu")
        self.model.eval()

    @property
    def seen_classes(self) -> int:
        return self.scenario.seen_classes(self.task)

    def to(self, device: str | torch.device) -> "ContinualClassifier":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _context(self) -> TaskContext:
        # predict / grow read only the task, the scenario, the config and the device
        return inference_context(self.task, self.scenario, self.config, self.device)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Image files, PIL images or HxWx3 uint8 arrays (one or a list) -> a batch with the test transform; a 4-d
        tensor is taken as already preprocessed."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return images
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        return torch.stack([self.transform(_as_pil(image)) for image in images])

    @torch.no_grad()
    def logits(self, images: Any) -> torch.Tensor:
        """Logits over the seen classes, in the scenario's class order (column j is class ``class_order[j]``).
        Methods whose prediction depends on the batch (batch-wise prompt selection) see the images in batches of
        their official test batch size, as in evaluation."""
        batch = self.preprocess(images)
        size = self.method.evaluation_batch() or self.config.train.eval_batch_size
        ctx = self._context()
        parts = []
        for start in range(0, len(batch), size):
            chunk = batch[start:start + size].to(self.device)
            with _autocast(self.device, self.config.train.mixed_precision):
                parts.append(self.method.predict(self.model, chunk, ctx)[:, :self.seen_classes].float().cpu())
        return torch.cat(parts)

    def predict(self, images: Any, top_k: int = 1) -> Predictions:
        if top_k < 1:
            raise SlcaKitError(f"top_k: must be >= 1, got {top_k}")
        probabilities = self.logits(images).softmax(dim=1)
        scores, columns = probabilities.topk(min(top_k, self.seen_classes), dim=1)
        order = self.scenario.class_order
        indices = [[int(order[c]) for c in row] for row in columns.tolist()]
        return Predictions(indices, [[self.class_names[i] for i in row] for row in indices], scores.tolist())


def inference_context(task: int, scenario: Scenario, config: Config, device: torch.device) -> TaskContext:
    unavailable = None  # training-time callbacks (features of the training data, process reductions)
    return TaskContext(task=task, scenario=scenario, config=config, accelerator=SimpleNamespace(device=device),
                       extract_features=unavailable, gather_features=unavailable, iterate_images=unavailable,
                       iterate_training_images=unavailable,
                       reduce_sum=lambda tensor: tensor, timer=None)


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("fp16", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return torch.autocast(device.type, enabled=False)


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise DataError(f"image arrays must be HxW or HxWx3 uint8, got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read it as an image ({err})") from None


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given and the image files of folders (sorted); none found is an error."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    if not found:
        raise DataError(f"no image files in {', '.join(map(str, paths))} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return found


# -- rebuilding the model ----------------------------------------------------------------------------------
def _inference_backbone(config: Config) -> Config:
    """The run's config with the backbone built bare (no download, no weights file): the checkpoint holds every
    weight."""
    config = copy.deepcopy(config)
    config.backbone.pretrained = False
    config.backbone.weights = None
    config.backbone.weights_key = None
    return config


def _assemble(config: Config, scenario: Scenario, task: int, class_names: list[str], model_state: dict,
              method_state: dict, source: Path) -> ContinualClassifier:
    config = _inference_backbone(config)
    method = build_method(config)
    model = build_model(config.backbone, config.adapter)
    device = torch.device("cpu")
    for index in range(task + 1):  # the checkpoint's structure: heads and the method's per-task modules
        model.head.add_task(scenario.task_sizes[index])
        method.grow(model, inference_context(index, scenario, config, device))
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not match the model rebuilt from its config: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    method.load_state_dict(method_state)
    return ContinualClassifier(config, model, method, scenario, task, class_names, source)


def _last_task_checkpoint(run_dir: Path) -> Path:
    finished = [path for path in ckpt.complete_checkpoints(run_dir / "checkpoints")
                if ckpt.read_progress(path)["epoch"] is None]
    if not finished:
        raise CheckpointError(f"{run_dir}: no complete task checkpoint under {run_dir / 'checkpoints'} (a run "
                              "has one after its first task)")
    return finished[-1]


def _load_run_folder(run_dir: Path) -> ContinualClassifier:
    from .resolve import load_config

    config = load_config(run_dir / "config.yaml")
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise CheckpointError(f"{run_dir}: no results.json (written with the first task's checkpoint)")
    results = read_json(results_path)
    scenario = Scenario(tuple(results["class_order"]), tuple(results["task_sizes"]))
    checkpoint = _last_task_checkpoint(run_dir)
    task = ckpt.read_progress(checkpoint)["task"]
    # runs before class names were recorded: the label ids stand for them
    names = results.get("class_names") or [str(i) for i in range(scenario.num_classes)]
    run_state = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)  # this run's own file
    return _assemble(config, scenario, task, names, load_file(str(checkpoint / "model.safetensors")),
                     run_state["method"], run_dir)


def _load_export(folder: Path) -> ContinualClassifier:
    from .resolve import config_from_dict

    meta = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
    recipe = meta["config"]
    if recipe["backbone"].get("source") == "transformers":
        recipe["backbone"]["name"] = str(folder / EXPORT_BACKBONE)
    config = config_from_dict(recipe)
    scenario = Scenario(tuple(meta["class_order"]), tuple(meta["task_sizes"]))
    tensors = load_file(str(folder / EXPORT_METHOD_STATE))
    return _assemble(config, scenario, meta["task"], meta["class_names"], load_file(str(folder / EXPORT_WEIGHTS)),
                     unpack_state(meta["method_state"], tensors), folder)


def load_run(path: str | Path, device: str | torch.device | None = None) -> ContinualClassifier:
    """A run folder (its latest task-end checkpoint) or a folder written by ``export_run``, on ``device`` (default:
    CUDA when available)."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        classifier = _load_export(path)
    elif (path / "config.yaml").is_file():
        classifier = _load_run_folder(path)
    else:
        raise SlcaKitError(f"{path}: neither a run folder (config.yaml) nor an exported model ({EXPORT_CONFIG})")
    return classifier.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# -- method state as safetensors + JSON ---------------------------------------------------------------------
def pack_state(value: Any, tensors: dict[str, torch.Tensor], path: str = "state") -> Any:
    """A method's state as JSON, its tensors moved into ``tensors`` (saved as safetensors, no pickle)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        return pack_state(torch.from_numpy(value), tensors, path)
    if isinstance(value, dict):
        return {"__dict__": [[key, pack_state(item, tensors, f"{path}.{key}")] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [pack_state(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [pack_state(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise SlcaKitError(f"export: the method state at {path} is a {type(value).__name__}, which cannot be exported")


def unpack_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [unpack_state(item, tensors) for item in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(unpack_state(item, tensors) for item in value["__tuple__"])
        return {key: unpack_state(item, tensors) for key, item in value["__dict__"]}
    return value
