#!/usr/bin/env bash
# Run every method on the Flowers-102 proxy (10 tasks, ../shared) and print the comparison table.
# CPU, 2 cores: about 4 minutes per method (1-2 for the frozen-backbone ones), joint about 15. Usage: bash benchmarks/proxy_table.sh [OUTPUT_DIR]
set -euo pipefail
out=${1:-runs/proxy}
methods=(seq_ft seq_ft_sl slca slca_pp inflora l2p dualprompt coda_prompt joint linear_probe
         ewc online_ewc mas si lwf replay generative_replay packnet pnn pnn_adapter den)
for method in "${methods[@]}"; do
  if [ ! -f "$out/$method/results.json" ] || ! grep -q '"complete": true' "$out/$method/results.json"; then
    resume=""
    [ -d "$out/$method/checkpoints" ] && resume="--resume"
    slca train "recipes/proxy/$method.yaml" "output_dir=$out" $resume
  fi
done
slca report "${methods[@]/#/$out/}" --output "$out/compare"
