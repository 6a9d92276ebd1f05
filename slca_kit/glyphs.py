"""The embedded demo's pretrained backbone, made on this machine: a small ViT pretrained by supervised
classification of printed glyphs (the 52 Latin letters and 27 symbols, no digit) rendered procedurally from the
fonts matplotlib installs, with random size, rotation, shear, offset, stroke width, brightness, blur and noise.
Three fonts are held out to measure how well the representation generalises. The demo then learns scikit-learn's
handwritten digits, classes this backbone never saw.

The weights are made once (about 1.5 minutes on 2 CPU cores) into the user's cache folder and reused;
``slca pretrain-glyphs`` makes them again, anywhere, with any settings."""
from __future__ import annotations

import dataclasses
import math
import os
import string
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm.auto import tqdm

from .errors import SlcaKitError
from .io import atomic_write, read_json, write_json_atomic

GLYPHS = string.ascii_letters + "!#$%&()*+-/:;<=>?@[]^{}~|\\_"  # no digit: the demo's classes stay unseen
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
              "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
              "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
              "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf")
HELD_OUT_FONTS = ("DejaVuSerif-Italic.ttf", "STIXGeneralBol.ttf", "cmss10.ttf")  # one per family kept unseen
TIMM_NAME = "vit_tiny_patch16_224"
# The demo's backbone: the digits default's ViT shape (32 px, 8 px patches, 4 blocks of 96-d, 3 heads).
VIT_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
CACHE_NAME = "glyph_vit_v1"  # bump when rendering or training changes, so old caches are not reused
CANVAS = 64  # rendered at 2x, then reduced to 32 px: smooth edges


@dataclasses.dataclass
class GlyphPretraining:
    """Pretraining settings; the defaults make the cached demo backbone (measured in README.md)."""
    per_class: int = 400  # training images per glyph: 31,600 in all
    epochs: int = 5
    batch_size: int = 256
    lr: float = 3e-3  # AdamW peak lr of a one-cycle schedule (10 % warm-up)
    weight_decay: float = 0.05
    seed: int = 0

    def validate(self) -> None:
        if min(self.per_class, self.epochs, self.batch_size) < 1:
            raise SlcaKitError("pretrain-glyphs: --per-class, --epochs and --batch-size must be at least 1")
        if not (0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf):
            raise SlcaKitError("pretrain-glyphs: --lr must be a positive number, --weight-decay 0 or more")


def font_path(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


def render(glyph: str, font: str, rng: np.random.RandomState) -> np.ndarray:
    """One 32 x 32 uint8 grey image of ``glyph``: bright strokes on a dark ground, as the digits are shown."""
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    face = ImageFont.truetype(str(font_path(font)), size=int(rng.randint(36, 60)))
    left, top, right, bottom = draw.textbbox((0, 0), glyph, font=face)
    draw.text(((CANVAS - (right - left)) / 2 - left, (CANVAS - (bottom - top)) / 2 - top), glyph, fill=255,
              font=face)
    width = rng.choice([0, 0, 1, 2])  # thicker strokes by dilation: 1, 3 or 5 px kernels
    if width:
        canvas = canvas.filter(ImageFilter.MaxFilter(2 * width + 1))
    angle, shear, scale = math.radians(rng.uniform(-18, 18)), rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.1)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    dx, dy = rng.uniform(-5, 5, size=2)
    # PIL's affine maps each output pixel (x, y) to the input (a x + b y + c, d x + e y + f): about the centre.
    a, b, d, e = cos, sin + shear, -sin, cos
    half = CANVAS / 2
    c, f = half - (a + b) * half + dx, half - (d + e) * half + dy
    canvas = canvas.transform((CANVAS, CANVAS), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2))).resize((32, 32), Image.BILINEAR)
    if rng.rand() < 0.5:  # half pass through 8 x 8, the resolution at which the demo's digits are stored
        canvas = canvas.resize((8, 8), Image.BOX).resize((32, 32), Image.BICUBIC)
    noise = rng.normal(0, rng.uniform(0, 12), (32, 32))
    image = np.asarray(canvas, dtype=np.float32) * rng.uniform(0.6, 1.0) + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def make_set(fonts: tuple[str, ...], per_class: int, seed: int, progress: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every glyph, cycling through ``fonts``; labels are indices into ``GLYPHS``."""
    rng = np.random.RandomState(seed)
    images, labels = [], []
    with tqdm(total=len(GLYPHS) * per_class, desc="rendering glyphs", disable=not progress, leave=False) as bar:
        for label, glyph in enumerate(GLYPHS):
            for index in range(per_class):
                images.append(render(glyph, fonts[index % len(fonts)], rng))
                labels.append(label)
            bar.update(per_class)
    return np.stack(images), np.asarray(labels)


def to_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 grey -> the digits preset's input: 3 identical channels, mean = std = 0.5."""
    x = torch.from_numpy(images).float().div(255).sub(0.5).div(0.5)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def accuracy(backbone: torch.nn.Module, head: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    backbone.eval()
    correct = 0
    for start in range(0, len(images), 512):
        logits = head(backbone(to_inputs(images[start:start + 512])))
        correct += int((logits.argmax(1) == torch.from_numpy(labels[start:start + 512])).sum())
    return 100.0 * correct / len(images)


def pretrain(settings: GlyphPretraining, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the demo's ViT on rendered glyphs; returns (backbone state dict, model card)."""
    import timm

    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    train_fonts = tuple(font for font in FONT_FILES if font not in HELD_OUT_FONTS)
    train_x, train_y = make_set(train_fonts, settings.per_class, settings.seed, progress)
    test_x, test_y = make_set(HELD_OUT_FONTS, max(settings.per_class // 10, 3), settings.seed + 1, progress)
    backbone = timm.create_model(TIMM_NAME, num_classes=0, **VIT_KWARGS)
    head = torch.nn.Linear(backbone.num_features, len(GLYPHS))
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, pct_start=0.1,
                                                   total_steps=settings.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed)
    log = []
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc="pretraining the demo ViT on glyphs",
               disable=not progress, unit="step")
    for epoch in range(settings.epochs):
        backbone.train()
        order = torch.randperm(len(train_x), generator=generator).numpy()
        losses = []
        for begin in range(0, len(order), settings.batch_size):
            batch = order[begin:begin + settings.batch_size]
            loss = F.cross_entropy(head(backbone(to_inputs(train_x[batch]))), torch.from_numpy(train_y[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
        log.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
                    "held_out_font_accuracy": round(accuracy(backbone, head, test_x, test_y), 2)})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", held_out=f"{log[-1]['held_out_font_accuracy']:.1f}%")
    bar.close()
    card = {"config": dict(VIT_KWARGS), "timm_name": TIMM_NAME, "mean": [0.5] * 3, "std": [0.5] * 3,
            "pretrained_on": f"{len(GLYPHS)} printed glyphs (letters and symbols, no digit) in {len(train_fonts)} "
                             f"matplotlib fonts, {settings.per_class} rendered images per glyph, supervised",
            "glyphs": GLYPHS, "train_fonts": list(train_fonts), "held_out_fonts": list(HELD_OUT_FONTS),
            "held_out_font_accuracy": log[-1]["held_out_font_accuracy"],
            "chance_accuracy": round(100 / len(GLYPHS), 2), "settings": dataclasses.asdict(settings),
            "log": log, "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
            "timm": timm.__version__,
            "command": "slca pretrain-glyphs " + " ".join(
                f"--{key.replace('_', '-')} {value}" for key, value in dataclasses.asdict(settings).items())}
    return {key: value.detach().contiguous() for key, value in backbone.state_dict().items()}, card


def save(state: dict[str, torch.Tensor], card: dict, folder: Path, name: str = CACHE_NAME) -> Path:
    """``name.safetensors`` (float32) and ``name.json`` (the card, usable as ``backbone.card``), each atomic;
    the card is written last, so a card means complete weights."""
    from safetensors.torch import save_file

    weights = Path(folder) / f"{name}.safetensors"
    atomic_write(weights, lambda tmp: save_file(state, tmp))
    write_json_atomic(weights.with_suffix(".json"), card)
    return weights


def cache_folder() -> Path:
    """``$SLCA_KIT_CACHE``, else ``~/.cache/slca_kit`` (the demo recipes use the same rule)."""
    return Path(os.environ.get("SLCA_KIT_CACHE") or Path.home() / ".cache" / "slca_kit").expanduser()


def ensure_demo_backbone(progress: bool = True) -> tuple[Path, dict]:
    """The cached demo backbone (weights path, card), pretrained first when the cache lacks it."""
    weights = cache_folder() / f"{CACHE_NAME}.safetensors"
    card_path = weights.with_suffix(".json")
    if weights.is_file() and card_path.is_file():
        return weights, read_json(card_path)
    print(f"first run: pretraining the demo's ViT on rendered glyphs (once; cached in {weights.parent})")
    state, card = pretrain(GlyphPretraining(), progress)
    return save(state, card, weights.parent), card
