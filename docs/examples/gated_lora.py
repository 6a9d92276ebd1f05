"""A LoRA layer that peft does not ship, plugged in through peft's custom-module registration.

GatedLoraLinear adds a learnable scalar gate per adapter, initialised at 0:
    y = W x + b + tanh(g) * (alpha / r) * B A x
so the adapted model starts exactly equal to the pretrained one whatever A and B are, and training opens the gate.
What it leaves out of peft's own LoRA ``Linear.forward``, on purpose, to stay short: DoRA (``use_dora``) and the
other LoRA variants, ``lora_bias``, mixed-adapter batches (``adapter_names=``), and the dtype casting peft does
for fp16/bf16 inputs (the update is computed in the adapter weights' dtype and added as is). Merging works, through
``get_delta_weight``. Use it from a recipe (this folder on PYTHONPATH):
    adapter:
      type: lora
      r: 4
      custom_modules: {torch.nn.Linear: gated_lora.GatedLoraLinear}
"""
from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn


class GatedLoraLinear(LoraLinear):
    # Names listed here are adapter parameters to peft: trainable, saved by get_peft_model_state_dict.
    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_gate",)

    def update_layer(self, adapter_name, *args, **kwargs):
        if "lora_gate" not in self._modules:  # peft's update_layer walks every adapter_layer_names entry
            self.lora_gate = nn.ParameterDict()
        super().update_layer(adapter_name, *args, **kwargs)
        self.lora_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=self.lora_A[adapter_name].weight.device))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Used by merge(): the gated update as a dense weight."""
        return torch.tanh(self.lora_gate[adapter]) * super().get_delta_weight(adapter)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            update = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype))))
            result = result + torch.tanh(self.lora_gate[name]) * update * self.scaling[name]
        return result
