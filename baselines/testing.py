"""Tiny random-weight causal LMs of each supported family, for tests and smoke runs.

They exercise shapes and plumbing only (random weights say nothing about
quality). Every config keeps at least 4 KV heads so that GQA, MQA and
per-KV-head eviction have something to reduce; ``tinyllama`` has 8 query heads
per KV head like TinyLlama-1.1B (32 query heads, 4 KV heads).
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
)

TINY_FAMILIES = ("llama", "tinyllama", "opt", "gemma2")


def tiny_config(family: str, **overrides):
    """A tiny config of ``family`` (one of :data:`TINY_FAMILIES`); keyword arguments override fields."""
    common = dict(vocab_size=97, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=8, tie_word_embeddings=False)
        cls = LlamaConfig
    elif family == "tinyllama":
        cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=32,
                   num_key_value_heads=4, head_dim=4, tie_word_embeddings=False)
        cls = LlamaConfig
    elif family == "opt":
        cfg = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                   word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, enable_bias=True)
        cls = OPTConfig
    elif family == "gemma2":
        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        cls = Gemma2Config
    else:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    cfg.update(common)
    cfg.update(overrides)
    return cls(**cfg)


def tiny_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny fp32 random-weight causal LM of ``family`` in eval mode, seeded."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    cls = {"llama": LlamaForCausalLM, "tinyllama": LlamaForCausalLM, "opt": OPTForCausalLM,
           "gemma2": Gemma2ForCausalLM}[family]
    model = cls(config).to(torch.float32).eval()
    # Random init gives attention logits near zero; wider weights make attention peaked,
    # so that evicting tokens visibly changes the output (tests rely on this).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 0.5)
    return model
