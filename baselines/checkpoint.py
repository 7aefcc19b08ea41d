"""Reloading GQA- and CLA-converted checkpoints (``save_pretrained`` output).

Its own module because it needs both conversions: ``baselines.cla`` builds on
``baselines.gqa``, and neither imports this one, so there is no import cycle.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from baselines.attention import model_family
from baselines.cla import convert_to_cla
from baselines.gqa import convert_to_gqa


def load_converted(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a ``save_pretrained`` checkpoint of a GQA- and/or CLA-converted model.

    A ``gqa_opt`` / ``cla_<family>`` directory (:mod:`baselines.hf`) loads through
    ``AutoModelForCausalLM``, whose converted class rebuilds the structure. Older directories:
    Llama / Gemma 2 GQA checkpoints are plain transformers checkpoints; OPT GQA
    and any CLA checkpoint need their converted structure rebuilt first (from
    ``config.num_key_value_heads`` and ``config.cla_kv_sources``), then the
    saved weights are loaded strictly (tied embeddings excepted).
    """
    from hfconvert import SOFTCAP_FUSED, converted_method

    config = AutoConfig.from_pretrained(path)
    if converted_method(config) is not None:  # a "gqa_opt" / "cla_<family>" checkpoint: its class rebuilds it
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        return model.to(device).eval()
    # Plain checkpoints, and older converted ones whose config names the base model type.
    family = model_family(config)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    sources = getattr(config, "cla_kv_sources", None)
    native = family != "opt" or kv_heads == heads
    if native and not sources:
        # sdpa, transformers' default, silently skips Gemma 2's attention-logit soft-capping;
        # the fused kernel is eager's function, faster.
        eager = {"attn_implementation": SOFTCAP_FUSED} if getattr(config, "attn_logit_softcapping", None) else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **eager)
        return model.to(device)
    skeleton_cfg = AutoConfig.from_pretrained(path)
    if family == "opt":
        skeleton_cfg.num_key_value_heads = heads  # transformers builds OPT as MHA
    if hasattr(skeleton_cfg, "cla_kv_sources"):
        del skeleton_cfg.cla_kv_sources
    model = AutoModelForCausalLM.from_config(skeleton_cfg, dtype=dtype or torch.float32)
    if family == "opt" and kv_heads != heads:
        convert_to_gqa(model, kv_heads)
    if sources:
        convert_to_cla(model, sources)
    state = _read_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint at {path} does not match the converted structure: "
            f"missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    return model.to(device).eval()


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as _load_file

    def load_file(name: str) -> dict[str, torch.Tensor]:
        try:
            return _load_file(name)
        except Exception as exc:  # safetensors raises its own error types for a damaged header or body
            raise ValueError(f"cannot read weights file {name} (truncated or not safetensors?): {exc}") from exc

    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state
