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
    slca train "proxy/$method" "output_dir=$out" $resume
  fi
done
# SLCA++ with its LoRA also on the MLP (the documented option; the released code trains the qkv LoRA only)
if [ ! -f "$out/slca_pp_mlp/results.json" ] || ! grep -q '"complete": true' "$out/slca_pp_mlp/results.json"; then
  resume=""
  [ -d "$out/slca_pp_mlp/checkpoints" ] && resume="--resume"
  slca train proxy/slca_pp "output_dir=$out" name=slca_pp_mlp \
    'adapter.target_modules=blocks\.\d+\.(attn\.qkv|mlp\.fc[12])' $resume
fi
slca report "${methods[@]/#/$out/}" "$out/slca_pp_mlp" --output "$out/compare"
