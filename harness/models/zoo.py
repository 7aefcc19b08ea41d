"""Model zoo: the four families the paper evaluates, each with its real architecture.

Every family keeps the features that matter for KV-cache compression:

* ``llama3``: Llama 3 (RMSNorm, SwiGLU, RoPE theta 500k, GQA with 4 query heads per KV head,
  tied embeddings as in Llama 3.2 1B / 3B).
* ``tinyllama``: Llama architecture with 8 query heads per KV head (TinyLlama-1.1B has
  32 query / 4 KV heads), untied embeddings, RoPE theta 10k.
* ``opt``: OPT (pre-LayerNorm as in opt-125m, biases everywhere, ReLU, learned positions,
  multi-head attention: as many KV heads as query heads).
* ``gemma2``: Gemma 2 (attention-logit and final-logit soft-capping, alternating
  sliding-window / global layers, query pre-attention scaling, ``head_dim`` different from
  ``hidden_size / num_attention_heads``, GeGLU, pre + post norms). Soft-capping is only
  implemented by the eager attention path, so Gemma 2 models are built and loaded with
  its fused equivalent, ``attn_implementation="eager_softcap_fused"``
  (:mod:`hfconvert.softcap_attention`; saved checkpoints record ``"eager"``).

``tiny`` sizes (a few million parameters, >= 4 KV heads so mixSGA group sizes 1 / 2 / 4
apply) are pretrained here for the offline profile; ``small`` sizes are for a GPU run
without hub access; ``checkpoints`` are the paper's hub models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config, LlamaConfig, OPTConfig, PretrainedConfig

from harness.models.shapes import SIZES
from hfconvert.softcap_attention import ATTN_NAME as SOFTCAP_FUSED


@dataclass(frozen=True)
class FamilySpec:
    """One model family: config class, sizes (config keyword arguments) and paper checkpoints."""

    name: str
    config_class: type[PretrainedConfig]
    sizes: dict[str, dict]
    checkpoints: tuple[str, ...]
    attn_implementation: str | None = None
    notes: str = ""
    fixed: dict = field(default_factory=dict)  # architecture constants shared by every size

    @property
    def model_type(self) -> str:
        return self.config_class.model_type


FAMILIES: dict[str, FamilySpec] = {
    "llama3": FamilySpec(
        name="llama3",
        config_class=LlamaConfig,
        fixed={"hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
               "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5},
        sizes=SIZES["llama3"],
        checkpoints=("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B"),
        notes="GQA with 4 query heads per KV head, RoPE theta 500k, tied embeddings (Llama 3.2 1B/3B)",
    ),
    "tinyllama": FamilySpec(
        name="tinyllama",
        config_class=LlamaConfig,
        fixed={"hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
               "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5},
        sizes=SIZES["tinyllama"],
        checkpoints=("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",),
        notes="Llama architecture, 8 query heads per KV head, untied embeddings",
    ),
    "opt": FamilySpec(
        name="opt",
        config_class=OPTConfig,
        # Dropout is an optimisation choice, not architecture; the tiny offline runs are far
        # too short to overfit, so it is off (OPT's pretraining used 0.1).
        fixed={"activation_function": "relu", "do_layer_norm_before": True, "enable_bias": True,
               "layer_norm_elementwise_affine": True, "tie_word_embeddings": True,
               "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0},
        sizes=SIZES["opt"],
        checkpoints=("facebook/opt-125m", "facebook/opt-350m"),
        notes="MHA with biases and learned positions (max_position_embeddings bounds the context)",
    ),
    "gemma2": FamilySpec(
        name="gemma2",
        config_class=Gemma2Config,
        fixed={"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "attention_bias": False,
               "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        sizes=SIZES["gemma2"],
        checkpoints=("google/gemma-2-2b",),
        attn_implementation=SOFTCAP_FUSED,
        notes="soft-capping, alternating sliding-window / global layers, head_dim != hidden/heads",
    ),
}

# Hub checkpoint -> family, for records and for picking the attention implementation.
CHECKPOINT_FAMILY = {ckpt: spec.name for spec in FAMILIES.values() for ckpt in spec.checkpoints}


def get_family(family: str) -> FamilySpec:
    """The spec of ``family``; ValueError naming the known families otherwise."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(FAMILIES)}") from None


def build_config(family: str, size: str, tokenizer, **overrides) -> PretrainedConfig:
    """Config of ``family`` at ``size`` for ``tokenizer``'s vocabulary and special tokens.

    ``overrides`` replace individual config fields (e.g. ``max_position_embeddings``).
    """
    spec = get_family(family)
    if size not in spec.sizes:
        raise ValueError(f"unknown size {size!r} for family {family!r}; known sizes: {sorted(spec.sizes)}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise ValueError(f"tokenizer has no {name}; the zoo needs bos, eos and pad tokens")
    kwargs = {
        **spec.fixed,
        **spec.sizes[size],
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    if spec.attn_implementation is not None:
        kwargs.setdefault("attn_implementation", spec.attn_implementation)
    return spec.config_class(**kwargs)


def family_of(config: PretrainedConfig) -> str:
    """Best family name for a loaded config (Llama-type models split on query heads per KV head)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llama":
        kv = config.num_key_value_heads or config.num_attention_heads
        return "tinyllama" if config.num_attention_heads // kv == 8 else "llama3"
    for spec in FAMILIES.values():
        if spec.model_type == model_type:
            return spec.name
    known = sorted({spec.model_type for spec in FAMILIES.values()})
    raise ValueError(f"unsupported model type {model_type!r}; the zoo supports model types {known} "
                     f"(families {sorted(FAMILIES)})")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return resolved


def load_base_model(
    path_or_hub_name: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` from a local ``save_pretrained`` directory or a hub name.

    Raises FileNotFoundError for a missing checkpoint, ValueError for a model type outside
    the zoo or a checkpoint that cannot be read (corrupt / incomplete weights).
    """
    from harness.data.tokenizer import load_tokenizer  # local import keeps zoo importable without tokenizers

    name = str(path_or_hub_name)
    path = Path(name)
    # Hub names are "org/name" at most; anything else that looks like a path is local.
    is_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if is_local:
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {name!r}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {name!r} (not a save_pretrained dir)")
        try:
            config = AutoConfig.from_pretrained(name)
        except (ValueError, OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read config of checkpoint {name!r}: {exc}") from exc
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except OSError as exc:
            raise FileNotFoundError(
                f"{name!r} is neither a local checkpoint directory nor reachable on the model hub "
                f"(offline? set HF_HOME to a cache that holds it): {exc}"
            ) from exc
    family = CHECKPOINT_FAMILY.get(name) or family_of(config)
    spec = get_family(family)
    kwargs = {"dtype": _resolve_dtype(dtype)}
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, **kwargs)
    except Exception as exc:  # safetensors, torch and transformers each raise their own types
        raise ValueError(f"cannot load weights of checkpoint {name!r} (corrupt or incomplete?): {exc}") from exc
    tokenizer = load_tokenizer(name)
    model.to(device)
    model.eval()
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
