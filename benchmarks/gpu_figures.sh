#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one go: train_step.py (ViT-B/16 224 px, fp32 trainer against the plain
# fp32 loop, then the accelerator fast path with MFU), ca_stage.py and data_pipeline.py on the GPU, each script's
# output in its own file under OUTDIR (default: $OUT, the device tool's folder that comes back).
#
# Usage: benchmarks/gpu_figures.sh [--quick] [OUTDIR [PART ...]]
#   PART      train_step_fp32, train_step_fast, ca_stage, data_pipeline (default: all four). Not yet timed on a GPU:
#             from ViT-B/16's FLOPs at H200 speeds and inductor's compile time, the first two should take 6-8 minutes
#             and the last two about 4, so split them over two calls of the device tool (10 minutes a call).
#   --quick   small sizes (tiny ViT, few images and epochs, 40 classes): checks that the script runs, on any machine.
# Environment: PEAK_TFLOPS, the GPU's dense bf16 peak for MFU (default 989.4: H100 / H200 SXM, NVIDIA's datasheet).
# A machine without `datasets` (data_pipeline.py needs it) installs the wheels in wheels/ if there are any: made
# beforehand for the machine's Python (3.12 on the device tool's GPU machines) with `pip download --no-deps
# --python-version 3.12 --only-binary=:all: -d wheels datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19`, carried along.
set -euo pipefail
quick=0
if [[ "${1:-}" == "--quick" ]]; then quick=1; shift; fi
out=${1:-${OUT:-}}
if [[ -z "$out" ]]; then echo "error: no output folder: give OUTDIR or set OUT" >&2; exit 2; fi
shift || true
all=(train_step_fp32 train_step_fast ca_stage data_pipeline)
parts=("${@:-${all[@]}}")
for part in "${parts[@]}"; do
  if [[ " ${all[*]} " != *" $part "* ]]; then echo "error: unknown PART '$part'; valid: ${all[*]}" >&2; exit 2; fi
done
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import datasets" 2>/dev/null && compgen -G "wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then nvidia-smi >"$out/nvidia_smi.txt" 2>&1 || true; fi
if ((quick)); then
  step=(--shape tiny --images 128 --epochs 2 --batch 32); fast=(--compile eager); ca=(--classes 40 --dim 128)
  pipeline=(--images 32 --epochs 2 --batch 16 --model-images-per-s 100)
else
  # batch 64 x 20 steps an epoch: long enough that an epoch's clock is not the launch of its first kernels
  step=(--shape vit-b --images 1280 --epochs 8 --batch 64); fast=(--compile inductor); ca=(); pipeline=()
fi
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
run() {  # name, command...: the output in $out/name.txt, progress bars dropped (the device tool brings 8 files
  # back: stderr is kept, as $out/name.stderr.txt, only where a part fails); a failure does not stop the rest
  local name=$1; shift
  if [[ " ${parts[*]} " != *" $name "* ]]; then return; fi
  echo "== $name: $*"
  if "$@" >"$out/$name.txt" 2>"$errors"; then tail -n 20 "$out/$name.txt"
  else echo "$name failed (exit $?): tail of $out/$name.stderr.txt"; cp "$errors" "$out/$name.stderr.txt"
    tail -n 20 "$errors"; fi
}
run train_step_fp32 "$python" benchmarks/train_step.py "${step[@]}"
run train_step_fast "$python" benchmarks/train_step.py "${step[@]}" --bf16 --optimizer-impl fused "${fast[@]}" \
  --peak-tflops "${PEAK_TFLOPS:-989.4}"
run ca_stage "$python" benchmarks/ca_stage.py "${ca[@]}"
run data_pipeline "$python" benchmarks/data_pipeline.py "${pipeline[@]}"
