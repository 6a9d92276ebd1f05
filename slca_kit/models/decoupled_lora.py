"""SD-LoRA's decoupled low-rank updates (Wu et al., ICLR 2025) on the unmodified timm ViT, through a forward hook on
each block's fused ``attn.qkv`` Linear, as WuYichen-97/SD-Lora-CL backbone/lora.py ``_LoRA_qkv_timm_train``
(:132-194) computes them: every task t owns a rank-r direction B_t A_t on the query slice and one on the value slice
of every block, and one magnitude m_t shared by all of them. The hook adds, to the query and value outputs,

    sum_{i < t} m_i * B_i A_i x / (||B_i||_F ||A_i||_F)  +  m_t * B_t A_t x

(:170-188: earlier directions normalised, the current one not). Directions start as LoRA does (A Kaiming-uniform,
B zero: :378-384); magnitudes start at ``magnitude_init`` (:326-328). peft has no tuner for one magnitude shared
across layers over normalised per-task directions, hence the hook.

SD-LoRA-KD (``absorb_last``) replaces a new direction that earlier ones span by offsets to their magnitudes, kept
per block and slice (RL-VIG/LibContinual core/model/backbone/transformer.py:288-332)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .hooked_tuner import HookedTuner

QUERY, VALUE = 0, 1


class DecoupledLoRA(HookedTuner):
    def __init__(self, blocks: nn.Sequential, magnitude_init: float):
        super().__init__()
        self.dim = blocks[0].attn.qkv.in_features
        self.layers = len(blocks)
        self.magnitude_init = magnitude_init
        self.down = nn.ParameterList()  # per task: A [layers, 2 (query, value), rank, dim]
        self.up = nn.ParameterList()  # per task: B [layers, 2, dim, rank]
        self.magnitudes = nn.ParameterList()  # per task: m, a scalar
        # per task, block and slice: the SD-LoRA-KD offset added to m (zero unless a later direction was absorbed)
        self.register_buffer("magnitude_offsets", torch.zeros(0, self.layers, 2))
        self.register_load_state_dict_pre_hook(self._zero_offsets_if_absent)
        for layer, block in enumerate(blocks):
            self._hooks.append(block.attn.qkv.register_forward_hook(self._add_updates(layer)))

    def add_task(self, rank: int) -> None:
        """A new direction per block and slice, and a new magnitude; the earlier magnitudes restart at
        ``magnitude_init`` too, as the official code rebuilds them for every task (models/sdlora.py:109,
        lora.py:328)."""
        down = torch.empty(self.layers, 2, rank, self.dim)
        for matrix in down.view(-1, rank, self.dim):
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))  # nn.Linear(dim, rank)'s init (lora.py:380)
        self.down.append(nn.Parameter(down))
        self.up.append(nn.Parameter(torch.zeros(self.layers, 2, self.dim, rank)))
        self.magnitudes.append(nn.Parameter(torch.tensor(0.0)))
        offsets = self.magnitude_offsets
        self.magnitude_offsets = torch.cat([offsets, offsets.new_zeros(1, self.layers, 2)])
        with torch.no_grad():
            for magnitude in self.magnitudes:
                magnitude.fill_(self.magnitude_init)

    def _zero_offsets_if_absent(self, module, state_dict, prefix, *args) -> None:
        """Checkpoints written before SD-LoRA-KD existed hold no offsets: they were zero."""
        state_dict.setdefault(prefix + "magnitude_offsets", torch.zeros_like(self.magnitude_offsets))

    def update(self, layer: int, which: int, x: torch.Tensor) -> torch.Tensor:
        """The summed update of the query (``which`` 0) or value (1) slice of block ``layer`` for inputs ``x``."""
        last = len(self.down) - 1
        total = 0.0
        for task, (down, up, magnitude) in enumerate(zip(self.down, self.up, self.magnitudes)):
            a, b = down[layer, which].to(x.dtype), up[layer, which].to(x.dtype)
            low_rank = (x @ a.T) @ b.T
            if task < last:
                # an absorbed (zeroed) direction adds 0 rather than 0 / 0 (transformer.py:322-332 skips it)
                norms = torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a)
                low_rank = low_rank / norms.clamp_min(torch.finfo(norms.dtype).tiny)
                magnitude = magnitude + self.magnitude_offsets[task, layer, which].to(x.dtype)
            total = total + magnitude * low_rank
        return total

    def direction_gram(self, layer: int, which: int) -> torch.Tensor:
        """Inner products <D_i, D_j>_F of every task's normalised direction D = B A / (||B||_F ||A||_F) on one
        block and slice, in float64, from the factors: <B_i A_i, B_j A_j>_F = sum((B_i^T B_j) * (A_i A_j^T)), so no
        dim x dim matrix is formed. A zeroed (absorbed) direction has zero rows."""
        downs = [down[layer, which].double() for down in self.down]
        ups = [up[layer, which].double() for up in self.up]
        scales = [torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a) for a, b in zip(downs, ups)]
        scales = [1.0 / s if s > 0 else s for s in scales]
        tasks = len(downs)
        gram = torch.zeros(tasks, tasks, dtype=torch.float64, device=downs[0].device)
        for i in range(tasks):
            for j in range(i, tasks):
                inner = ((ups[i].T @ ups[j]) * (downs[i] @ downs[j].T)).sum() * scales[i] * scales[j]
                gram[i, j] = gram[j, i] = inner
        return gram

    @torch.no_grad()
    def absorb_last(self, threshold: float) -> list[tuple[int, int, float, float]]:
        """SD-LoRA-KD (arXiv 2501.13198 Eq. 7-8, Algorithm 1 lines 10-12): on every block and slice, fit the last
        task's normalised direction by the earlier ones in the least-squares sense; where the residual's Frobenius
        norm is at most ``threshold``, add the coefficients to the earlier magnitudes (as offsets) and zero the new
        direction. Returns (block, slice, residual, ||D_t||_F) for every fit."""
        last = len(self.down) - 1
        fits = []
        for layer in range(self.layers):
            for which in (QUERY, VALUE):
                gram = self.direction_gram(layer, which).cpu()
                earlier, target = gram[:last, :last], gram[:last, last]
                coefficients = torch.linalg.pinv(earlier, hermitian=True) @ target  # min-norm: absorbed ones get 0
                residual = float((gram[last, last] - coefficients @ target).clamp_min(0.0).sqrt())
                fits.append((layer, which, residual, float(gram[last, last].sqrt())))
                if residual <= threshold:
                    offsets = self.magnitude_offsets[:last, layer, which]
                    offsets += coefficients.to(offsets)
                    self.down[last][layer, which].zero_()
                    self.up[last][layer, which].zero_()
        return fits

    def _add_updates(self, layer: int):
        def add(module, inputs, output):
            if not self.enabled or not len(self.down):
                return None
            x = inputs[0]
            query = self.update(layer, QUERY, x)
            value = self.update(layer, VALUE, x)
            zeros = torch.zeros_like(query)
            return output + torch.cat([query, zeros, value], dim=-1)

        return add
