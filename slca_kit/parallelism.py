"""Which of accelerate's ways of spreading work over processes slca_kit trains with: one process, or DDP (one full
copy of the model per process, over CPUs or GPUs, on one or several nodes). Sharded engines are refused up front."""
from __future__ import annotations

import os

from accelerate.utils import DistributedType

from .errors import ConfigError

SUPPORTED = ("one process, DDP over CPUs (gloo) or GPUs (nccl), on one or several nodes (torchrun or accelerate "
             "launch --multi_gpu)")
# accelerate launch --use_fsdp / --use_deepspeed / --use_megatron_lm set these for the processes it starts.
SHARDED_ENGINE_FLAGS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                        "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
SHARDED_TYPES = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
                 DistributedType.MEGATRON_LM: "Megatron-LM"}


def _refusal(engine: str, how: str) -> ConfigError:
    return ConfigError(
        f"{how}: {engine} is not supported. slca_kit's methods attach hooks to the backbone's blocks, split parameters "
        f"into groups by name, and compute class statistics and alignment on the whole, unsharded model, which a "
        f"sharding engine does not give them. Supported: {SUPPORTED}; to lower the memory per GPU, use "
        f"train.mixed_precision: bf16 and train.gradient_accumulation_steps.")


def refuse_sharded_launch(environ: dict[str, str] | None = None) -> None:
    """Before the Accelerator is built (accelerate would otherwise fail with a traceback, e.g. DeepSpeed not
    installed, or start sharding): refuse a launch that asked for a sharding engine."""
    environ = os.environ if environ is None else environ
    for flag, engine in SHARDED_ENGINE_FLAGS.items():
        if environ.get(flag, "false").lower() in ("true", "1", "yes"):
            raise _refusal(engine, f"environment {flag}={environ[flag]} (accelerate launch --use_{engine.lower()})")


def refuse_sharded_state(distributed_type: DistributedType) -> None:
    """After the Accelerator is built: refuse any sharding engine it chose (e.g. from a plugin in its config)."""
    if distributed_type in SHARDED_TYPES:
        raise _refusal(SHARDED_TYPES[distributed_type], f"accelerate distributed_type {distributed_type.value}")
