"""The first-session modules attached by hooks (slca_kit/models/ssf.py, visual_prompts.py) compute what the official
SSF and VPT ViTs compute (RanPAC/RanPAC petl/vision_transformer_ssf.py, petl/vpt.py, written out below), switch off
to the pretrained ViT and detach; APER with each trains only its module and keeps [pretrained, adapted] prototypes;
bad settings are refused."""
from __future__ import annotations

import pytest
import torch

from slca_kit.errors import ConfigError
from slca_kit.models.ssf import ScaleShiftTuner
from slca_kit.models.visual_prompts import VisualPrompts

from conftest import TINY_VIT, cloned_state, hooked_vit_trainer, record_after_each_task, tiny_timm_vit


def _official_ssf_features(vit, ssf, x):
    """petl/vision_transformer_ssf.py forward_features (:522-537) with Block (:252-255), Attention (:196-213),
    Mlp (:157-170) and PatchEmbed (:358-373), on the pretrained ViT's weights."""
    def ada(site, z):
        return z * ssf.maps[site].scale + ssf.maps[site].shift

    tokens = ada("patch_embed", vit.patch_embed.proj(x).flatten(2).transpose(1, 2))
    tokens = vit._pos_embed(tokens)
    for index, block in enumerate(vit.blocks):
        site, attn = f"blocks_{index}_", block.attn
        h = ada(site + "norm1", block.norm1(tokens))
        batch, count, dim = h.shape
        qkv = ada(site + "attn_qkv", attn.qkv(h)).reshape(batch, count, 3, attn.num_heads, dim // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
        h = ada(site + "attn_proj", attn.proj((weights @ v).transpose(1, 2).reshape(batch, count, dim)))
        tokens = tokens + h
        h = ada(site + "norm2", block.norm2(tokens))
        h = ada(site + "mlp_fc2", block.mlp.fc2(block.mlp.act(ada(site + "mlp_fc1", block.mlp.fc1(h)))))
        tokens = tokens + h
    return ada("norm", vit.norm(tokens))[:, 0]


def test_ssf_hooks_compute_the_official_ssf_vit():
    vit, x = tiny_timm_vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
        ssf = ScaleShiftTuner(vit)
        # 6 sites per block, the patch tokens and the final norm; qkv and fc1 are 3x and 4x wide
        dim = TINY_VIT["embed_dim"]
        assert sum(p.numel() for p in ssf.parameters()) == 2 * (2 * dim + TINY_VIT["depth"] * (3 + 3 + 4 + 1) * dim)
        scales = torch.cat([m.scale for m in ssf.maps.values()])
        assert abs(scales.mean() - 1) < 0.01 and 0.01 < scales.std() < 0.03  # N(1, 0.02) (:378-385)
        adapted = vit(x)
        with ssf.disabled():
            assert torch.equal(vit(x), plain)
            expected = _official_ssf_features(vit, ssf, x)  # the hooks off, so each scale is applied once
        assert torch.allclose(adapted, expected, atol=1e-5) and not torch.allclose(adapted, plain, atol=1e-2)
        ssf.remove()
        assert torch.equal(vit(x), plain)


@pytest.mark.parametrize("deep", [True, False])
def test_prompt_hooks_compute_the_official_vpt_vit(deep):
    vit, x = tiny_timm_vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
        prompts = VisualPrompts(vit.blocks, TINY_VIT["embed_dim"], tokens=3, deep=deep)
        assert not prompts.prompts.any() and prompts.prompts.shape[0] == (TINY_VIT["depth"] if deep else 1)
        prompts.prompts.normal_()
        adapted = vit(x)
        with prompts.disabled():
            assert torch.equal(vit(x), plain)
            # petl/vpt.py forward_features (:97-128): append after the class and patch tokens, drop after
            tokens = vit._pos_embed(vit.patch_embed(x))
            if deep:
                for block, layer_prompts in zip(vit.blocks, prompts.prompts):
                    tokens = block(torch.cat([tokens, layer_prompts.expand(2, -1, -1)], dim=1))[:, :-3]
            else:
                tokens = vit.blocks(torch.cat([tokens, prompts.prompts[0].expand(2, -1, -1)], dim=1))[:, :-3]
            expected = vit.norm(tokens)[:, 0]
        assert torch.allclose(adapted, expected, atol=1e-5) and not torch.allclose(adapted, plain, atol=1e-2)
        prompts.remove()
        assert torch.equal(vit(x), plain)


def _trainer(tiny_npz, tmp_path, **params):
    return hooked_vit_trainer(tiny_npz, tmp_path, "aper", **params)


@pytest.mark.parametrize("first_session", ["ssf", "vpt_shallow"])
def test_aper_trains_only_the_module_on_the_first_task(tiny_npz, tmp_path, first_session):
    trainer = _trainer(tiny_npz, tmp_path, first_session=first_session, prompt_tokens=2)
    initial = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    tuner_after = record_after_each_task(trainer, lambda model: cloned_state(model.first_session_tuner))
    grow = trainer.method.grow

    def record_initial(model, ctx):  # the module as attached, before it trains
        grow(model, ctx)
        if ctx.task == 0:
            tuner_after.append(cloned_state(model.first_session_tuner))

    trainer.method.grow = record_initial
    trainer.run()
    model, method = trainer.model, trainer.method
    assert all(torch.equal(v, initial[k]) for k, v in model.backbone.state_dict().items())  # the ViT never moves
    initial_tuner, first, last = tuner_after[0], tuner_after[1], tuner_after[-1]
    assert all(not torch.equal(initial_tuner[k], first[k]) for k in first)  # every part trained on task 0
    assert all(torch.equal(first[k], last[k]) for k in first)  # then frozen
    features, labels = trainer.extract_features(list(range(6)), "train")  # the adapted ViT
    with model.first_session_tuner.disabled():
        pretrained, _ = trainer.extract_features(list(range(6)), "train")
    both = torch.cat([pretrained, features], 1)
    expected = torch.stack([both[labels == c].mean(0) for c in range(6)])
    assert torch.allclose(method.prototypes, expected, atol=1e-5)
    assert not torch.allclose(features, pretrained, atol=1e-3)


@pytest.mark.parametrize("params, key", [({"first_session": "lora"}, "first_session"),
                                         ({"first_session": "vpt_deep", "prompt_tokens": 0}, "prompt_tokens")])
def test_bad_first_session_settings_are_refused(tiny_npz, tmp_path, params, key):
    with pytest.raises(ConfigError, match=key):
        _trainer(tiny_npz, tmp_path, **params)
