"""Several trainings one after another in one torchrun launch: most of a tiny two-process run is the start-up of
its interpreters. ``python -m torch.distributed.run ... tests/ddp_jobs.py JOBS.json``, JOBS a JSON list of
[recipe path, override, ...]."""
import json
import sys
from pathlib import Path

from slca_kit.cli import _end_distributed
from slca_kit.resolve import load_config
from slca_kit.trainer import Trainer

if __name__ == "__main__":
    for recipe, *overrides in json.loads(Path(sys.argv[1]).read_text()):
        Trainer(load_config(recipe, overrides)).run()
    _end_distributed()
