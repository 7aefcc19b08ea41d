"""Size presets of the zoo's families, as plain data (no torch import).

The workflow reads them while it expands the config (before any job) to derive MQA's budget
and reject budgets a model cannot store; ``harness.models.zoo`` builds the model configs from them.
"""

from __future__ import annotations

SIZES: dict[str, dict[str, dict]] = {
    "llama3": {
        "tiny": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                 "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 16,
                 "max_position_embeddings": 2048},
        "small": {"hidden_size": 768, "intermediate_size": 2688, "num_hidden_layers": 12,
                  "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 48,
                  "max_position_embeddings": 4096},
    },
    "tinyllama": {
        # 32 query heads / 4 KV heads as in TinyLlama-1.1B; head_dim 16 keeps the query
        # heads usable at this width (TinyLlama itself has head_dim 64 = 2048 / 32).
        "tiny": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 16,
                 "max_position_embeddings": 2048},
        "small": {"hidden_size": 768, "intermediate_size": 2112, "num_hidden_layers": 12,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 24,
                  "max_position_embeddings": 2048},
    },
    "opt": {  # multi-head attention: as many K/V heads as query heads
        "tiny": {"hidden_size": 256, "ffn_dim": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
                 "word_embed_proj_dim": 256, "max_position_embeddings": 1024},
        "small": {"hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "word_embed_proj_dim": 768, "max_position_embeddings": 2048},
    },
    "gemma2": {
        # head_dim 48 != 256 / 8; the sliding window (64) is shorter than the training
        # sequence (256) so the local layers really are local.
        "tiny": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 48,
                 "query_pre_attn_scalar": 48, "sliding_window": 64, "max_position_embeddings": 2048},
        "small": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128,
                  "query_pre_attn_scalar": 128, "sliding_window": 512, "max_position_embeddings": 4096},
    },
}


def kv_heads(family: str, size: str) -> int:
    """K/V heads per layer of ``family`` at ``size`` (query heads where the family has no GQA)."""
    try:
        shape = SIZES[family][size]
    except KeyError:
        raise ValueError(f"unknown family / size {family!r} / {size!r}; known: "
                         f"{ {f: sorted(s) for f, s in SIZES.items()} }") from None
    return int(shape.get("num_key_value_heads", shape["num_attention_heads"]))
