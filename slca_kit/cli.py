"""Command line: ``slca train | reproduce | eval | predict | export | report | pretrain-glyphs | list``
(also ``python -m slca_kit``)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .checkpoint import latest_checkpoint
from .errors import Preempted, SlcaKitError
from .io import read_json
from .recipe_files import find_recipe


def _split_recipe(args: list[str]) -> tuple[Path | None, list[str]]:
    """The first argument without '=' is the recipe (a file or a packaged recipe's name); the rest are overrides.
    No recipe: the embedded demo."""
    if args and "=" not in args[0]:
        return find_recipe(args[0]), args[1:]
    return None, args


def cmd_train(ns: argparse.Namespace) -> int:
    from .resolve import load_config
    from .trainer import configure_logging

    configure_logging()
    recipe, overrides = _split_recipe(ns.args)
    if recipe is None:
        return _train_demo(ns, overrides)
    if not ns.seeds:
        return _train_one(ns, load_config(recipe, overrides), resume=ns.resume)
    return _train_seeds(ns, recipe, overrides, ns.seeds, resume=ns.resume)


def _train_demo(ns: argparse.Namespace, overrides: list[str]) -> int:
    """slca, seq_ft_sl and seq_ft from the cached glyph-pretrained ViT (made first if missing), then one table
    and one plot. Finished runs of the same settings are reused; interrupted ones continue."""
    from .demo import demo_configs, run_state, summary
    from .glyphs import ensure_demo_backbone

    if ns.seeds:
        raise SlcaKitError("--seeds: name a recipe (e.g. slca train demo/slca --seeds 1993 1996 1997); the default "
                           "job runs each demo method once")
    card = {}
    if not any(item.startswith("backbone.") for item in overrides):  # another backbone needs no glyph weights
        card = ensure_demo_backbone()[1]
    configs = demo_configs(overrides)
    for config in configs:
        state = run_state(config)
        if state == "complete":
            print(f"{config.name}: complete in {Path(config.output_dir) / config.name}, reused")
            continue
        status = _train_one(ns, config, resume=state == "started")
        if status:
            return status
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one table
        output = Path(configs[0].output_dir)
        print(summary([output / config.name for config in configs], card, output))
    return 0


def _train_seeds(ns: argparse.Namespace, recipe: Path, overrides: list[str], seeds: list[int], resume: bool) -> int:
    """One run per class-order seed, in sibling folders NAME_seedS, one after the other: complete runs are
    skipped; with ``resume`` an interrupted one continues."""
    from .resolve import load_config

    base = load_config(recipe, overrides).name
    for seed in seeds:
        config = load_config(recipe, overrides + [f"scenario.class_order_seed={seed}", f"name={base}_seed{seed}"])
        results = Path(config.output_dir) / config.name / "results.json"
        if results.is_file() and read_json(results).get("complete"):
            print(f"{config.name}: complete, skipped")
            continue
        has_checkpoints = latest_checkpoint(Path(config.output_dir) / config.name / "checkpoints") is not None
        status = _train_one(ns, config, resume=resume and has_checkpoints)
        if status:
            return status
    return 0


def _train_one(ns: argparse.Namespace, config, resume: bool) -> int:
    from .trainer import Trainer

    trainer = Trainer(config)
    try:
        results = trainer.run(resume=resume, allow_config_change=ns.allow_config_change)
    except Preempted as stop:  # ns.resume_command: the command line that continues, set by main / cmd_reproduce
        print(f"{stop}; continue with: {shlex.join(ns.resume_command)}", file=sys.stderr)
        return 128 + stop.signal_number  # the shell's convention for "ended by signal N"
    if trainer.accelerator.is_main_process:
        print(f"{config.name}: Last-Acc {results['last_acc']:.2f}  Inc-Acc {results['inc_acc']:.2f}  "
              f"-> {trainer.run_dir / 'results.json'}")
    return 0


def cmd_reproduce(ns: argparse.Namespace) -> int:
    from .reproduce import DEFAULT_SEEDS, collect, estimate, recipes_of, run_location, select_targets, write_outputs
    from .trainer import configure_logging

    targets = select_targets(ns.table, ns.benchmarks, ns.methods)
    seeds = ns.seeds or list(DEFAULT_SEEDS)
    output = Path(ns.output or Path("reproduce") / ns.table)
    for target in recipes_of(targets):
        output_dir, _ = run_location(output, target, seeds[0])
        overrides = [f"output_dir={output_dir}", f"name={target.method}", *ns.overrides]
        command = ["slca", "train", target.recipe, *overrides, "--seeds", *map(str, seeds)]
        if ns.dry_run:
            print(f"{shlex.join(command)}\n    # {estimate(target, overrides, output, seeds)}")
            continue
        configure_logging()
        ns.resume_command = ["slca", "reproduce", ns.table, *ns.original_args]
        status = _train_seeds(ns, find_recipe(target.recipe), overrides, seeds, resume=True)
        if status:
            return status
    if ns.dry_run:
        return 0
    print(write_outputs(collect(targets, seeds, output), output, ns.table))
    print(f"-> {output / 'reproduce.md'}, reproduce.json, reproduce.png")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .resolve import load_config
    from .trainer import Trainer, configure_logging

    configure_logging()
    run_dir = Path(ns.run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise SlcaKitError(f"{run_dir}: no config.yaml (expected a run folder written by 'slca train')")
    config = load_config(config_path)
    trainer = Trainer(config, run_dir)
    checkpoint = (Path(ns.checkpoint) if ns.checkpoint
                  else ckpt.latest_valid_checkpoint(trainer.checkpoint_root, warn=lambda m: print(m, file=sys.stderr)))
    if checkpoint is None or not (checkpoint / ckpt.PROGRESS_FILE).is_file():
        raise SlcaKitError(f"{run_dir}: no complete checkpoint to evaluate")
    task = trainer.load_for_eval(checkpoint)
    ctx = trainer.context(task)
    settings = [("class-incremental", trainer.evaluate(ctx))]
    if trainer.method.needs_task_id:
        settings.append(("task-incremental", trainer.evaluate_task_incremental(ctx)))
    for setting, (correct, totals) in settings:
        if trainer.accelerator.is_main_process:
            per_task = "  ".join(f"t{j}: {100 * c / n:.2f}" for j, (c, n) in enumerate(zip(correct, totals)))
            print(f"{checkpoint.name}: {setting} accuracy on {sum(totals)} test images of "
                  f"{trainer.scenario.seen_classes(task)} classes {100 * sum(correct) / sum(totals):.2f}%  "
                  f"({per_task})")
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    from .inference import image_files, load_run

    files = image_files(ns.images)
    model = load_run(ns.run_dir, device=ns.device)
    for start in range(0, len(files), 64):
        chunk = files[start:start + 64]
        predictions = model.predict(chunk, top_k=ns.top_k)
        for path, names, scores in zip(chunk, predictions.names, predictions.scores):
            print(f"{path}: " + ", ".join(f"{name} {score:.3f}" for name, score in zip(names, scores)))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from .export import export_run, push_to_hub

    folder = export_run(ns.run_dir, ns.out_dir)
    print(f"-> {folder}")
    if ns.push_to_hub:
        print(f"-> {push_to_hub(folder, ns.push_to_hub)}")
    return 0


def cmd_pretrain_glyphs(ns: argparse.Namespace) -> int:
    from .glyphs import CACHE_NAME, GlyphPretraining, cache_folder, pretrain, save

    given = {key: getattr(ns, key) for key in ("per_class", "epochs", "batch_size", "lr", "weight_decay", "seed")}
    settings = GlyphPretraining(**{key: value for key, value in given.items() if value is not None})
    settings.validate()
    state, card = pretrain(settings)
    weights = save(state, card, Path(ns.output) if ns.output else cache_folder(), CACHE_NAME)
    print(f"held-out-font accuracy {card['held_out_font_accuracy']}% (chance {card['chance_accuracy']}%) in "
          f"{card['seconds']:.0f} s -> {weights} and {weights.with_suffix('.json').name}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from .report import report

    print(report([Path(p) for p in ns.run_dirs], Path(ns.output) if ns.output else None))
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    from .data.benchmarks import BENCHMARKS
    from .methods import METHODS
    from .published import targets_by_recipe
    from .recipe_files import packaged_recipes

    print("methods:    " + ", ".join(sorted(METHODS)))
    print("benchmarks: " + ", ".join(sorted(BENCHMARKS)))
    print("recipes (slca train NAME) and the published numbers they are compared with:")
    targets = targets_by_recipe()
    for name in packaged_recipes():
        tables: dict[str, list[str]] = {}
        for target in targets.get(name, []):
            tables.setdefault(target.table, []).append(target.describe())
        cells = "; ".join(f"{table}: {', '.join(values)}" for table, values in tables.items())
        print(f"  {name:<30} {cells}".rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slca", description="Continual fine-tuning of pretrained ViTs (SLCA).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a recipe: slca train [RECIPE.yaml] [key=value ...]")
    train.add_argument("args", nargs="*",
                       help="recipe path or name (none: the embedded demo, three methods on digits), then overrides")
    train.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    train.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                       help="one run per class-order seed (NAME_seedS), one after the other; complete runs are "
                            "skipped, with --resume interrupted ones continue (the paper: 1993 1996 1997)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: accept a recipe that differs from the run's (recorded in results.json)")
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("eval", help="evaluate a run's checkpoint on all classes it has seen")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    evaluate.set_defaults(func=cmd_eval)
    pred = sub.add_parser("predict", help="classify images with a run's (or an export's) latest model")
    pred.add_argument("run_dir", help="a run folder or a folder written by `slca export`")
    pred.add_argument("images", nargs="+", help="image files or folders of images")
    pred.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    pred.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    pred.set_defaults(func=cmd_predict)
    exp = sub.add_parser("export", help="write a self-contained model folder (weights, config, model card)")
    exp.add_argument("run_dir")
    exp.add_argument("out_dir", help="a new folder (an existing one is never overwritten)")
    exp.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload it to this Hub model repository")
    exp.set_defaults(func=cmd_export)
    rep = sub.add_parser("report", help="re-plot runs and print a comparison table")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--output", help="folder for the comparison plot and table")
    rep.set_defaults(func=cmd_report)
    repro = sub.add_parser("reproduce", help="run or collect a published table's cells over seeds, ours vs paper")
    repro.add_argument("table", help="slca_table1, method_papers or proxy (see `slca list`)")
    repro.add_argument("overrides", nargs="*", help="key=value for every run (e.g. train.mixed_precision=bf16)")
    repro.add_argument("--benchmarks", nargs="+", help="only these benchmarks (cifar100, imagenet_r, ...)")
    repro.add_argument("--methods", nargs="+", help="only these methods")
    repro.add_argument("--seeds", nargs="+", type=int, help="class-order seeds (default: 1993 1996 1997)")
    repro.add_argument("--output", help="folder for the runs and the table (default: reproduce/TABLE)")
    repro.add_argument("--dry-run", action="store_true", help="print the commands and the estimated cost only")
    repro.set_defaults(func=cmd_reproduce, allow_config_change=False)
    glyphs = sub.add_parser("pretrain-glyphs", help="pretrain the demo's ViT on rendered glyphs (the default job "
                                                    "does this once into its cache)")
    glyphs.add_argument("--output", help="folder for glyph_vit_v1.safetensors and .json (default: the cache folder, "
                                         "$SLCA_KIT_CACHE or ~/.cache/slca_kit)")
    glyphs.add_argument("--per-class", type=int, help="training images per glyph (default: the demo's, 400)")
    glyphs.add_argument("--epochs", type=int, help="default: the demo's, 5")
    glyphs.add_argument("--batch-size", type=int, help="default: the demo's, 256")
    glyphs.add_argument("--lr", type=float, help="AdamW peak lr of the one-cycle schedule (default: the demo's, 3e-3)")
    glyphs.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the demo's, 0.05)")
    glyphs.add_argument("--seed", type=int, help="default: the demo's, 0")
    glyphs.set_defaults(func=cmd_pretrain_glyphs)
    lst = sub.add_parser("list", help="list methods, benchmarks and recipes with their published numbers")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser().parse_args(argv)
    ns.original_args = argv[2:] if argv[:1] == ["reproduce"] else []
    if ns.command == "train":  # what to print when a signal stops the run
        ns.resume_command = ["slca", "train", *ns.args] + (["--seeds", *map(str, ns.seeds)] if ns.seeds else [])
        ns.resume_command += ["--resume"] + (["--allow-config-change"] if ns.allow_config_change else [])
    try:
        return ns.func(ns)
    except (SlcaKitError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output was piped into `head` or similar, which has stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM during training, or one before training started
        print("error: interrupted; work since the last complete checkpoint is lost (--resume continues from it)",
              file=sys.stderr)
        return 130
    finally:
        _end_distributed()


def _end_distributed() -> None:
    """Under torchrun / accelerate launch, leave the process group once every run of this command is done."""
    torch = sys.modules.get("torch")  # a command that never imported torch made no process group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
