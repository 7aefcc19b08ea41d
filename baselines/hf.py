"""Checkpoint types of the converted baselines: ``gqa_opt`` and ``cla_llama`` / ``cla_opt`` / ``cla_gemma2``.

The machinery (model types, registration with the Auto classes, the remote-code shim,
strict loading, :func:`save_converted`) is :mod:`hfconvert`'s; this module only defines the
classes. Importing ``baselines`` registers them.

* ``gqa_opt``: transformers' OPT is multi-head only, so an OPT with fewer K/V heads
  (:func:`baselines.gqa.convert_to_gqa`) gets its own type; its model class builds the MHA
  OPT, then regroups to ``config.num_key_value_heads`` (:class:`baselines.attention.KVAttention`).
  GQA / MQA on Llama and Gemma 2 is native and stays a plain checkpoint.
* ``cla_<family>``: cross-layer sharing (:func:`baselines.cla.convert_to_cla`), rebuilt from
  ``config.cla_kv_sources`` after GQA where the family needs it (OPT with fewer K/V heads).

Both record the attention kernel they ran with (``attn_implementation``, when eager or sdpa)
in ``config.json``: transformers does not, and Gemma 2 reloaded with its sdpa default would
silently drop the attention-logit soft-capping that eager applies.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from baselines.attention import KVAttention, decoder_layers
from hfconvert import (
    ConvertedConfig,
    ConvertedModel,
    check_savable,
    converted_method,
    mark_converted,
    recorded_attention,
    register_converted,
    save_converted,
)

__all__ = ["check_savable", "converted_method", "mark_converted", "save_converted"]


class BaselineConfig(ConvertedConfig):
    """A converted baseline's config: also records the attention kernel (see module doc)."""

    def to_dict(self) -> dict:
        out = super().to_dict()
        kernel = recorded_attention(self._attn_implementation)
        if kernel is not None:
            out["attn_implementation"] = kernel
        return out


class BaselineModel(ConvertedModel):
    """Rebuilds GQA (OPT) and CLA from the config right after the base model is built."""

    def __init__(self, config, *args, **kwargs) -> None:
        from baselines.cla import convert_to_cla
        from baselines.gqa import convert_to_gqa

        super().__init__(config, *args, **kwargs)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        if isinstance(self, OPTForCausalLM) and kv_heads != heads:
            convert_to_gqa(self, kv_heads)  # transformers built OPT as MHA
        sources = getattr(config, "cla_kv_sources", None)
        if type(config).method == "cla":
            if not sources:
                raise ValueError(f"{type(self).__name__} needs `cla_kv_sources` in its config")
            convert_to_cla(self, sources)


def _has_kv_attention(model: nn.Module) -> bool:
    """Narrowed K/V heads on OPT live in KVAttention modules (Llama / Gemma 2 GQA is native)."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return False
    return isinstance(model, OPTForCausalLM) and any(
        isinstance(layer.self_attn, KVAttention) and layer.self_attn.kv_source is None
        and layer.self_attn.num_key_value_heads != layer.self_attn.num_heads for layer in layers)


def _has_cla(model: nn.Module) -> bool:
    try:
        layers = decoder_layers(model)
    except ValueError:
        return False
    return any(getattr(layer.self_attn, "kv_source", None) is not None for layer in layers)


class GQAOPTConfig(BaselineConfig, OPTConfig):
    model_type = "gqa_opt"
    method = "gqa"
    base_config_class = OPTConfig
    model_class_name = "GQAOPTForCausalLM"


class GQAOPTForCausalLM(BaselineModel, OPTForCausalLM):
    config_class = GQAOPTConfig


class CLALlamaConfig(BaselineConfig, LlamaConfig):
    model_type = "cla_llama"
    method = "cla"
    base_config_class = LlamaConfig
    model_class_name = "CLALlamaForCausalLM"


class CLALlamaForCausalLM(BaselineModel, LlamaForCausalLM):
    config_class = CLALlamaConfig


class CLAOPTConfig(BaselineConfig, OPTConfig):
    model_type = "cla_opt"
    method = "cla"
    base_config_class = OPTConfig
    model_class_name = "CLAOPTForCausalLM"


class CLAOPTForCausalLM(BaselineModel, OPTForCausalLM):
    config_class = CLAOPTConfig


class CLAGemma2Config(BaselineConfig, Gemma2Config):
    model_type = "cla_gemma2"
    method = "cla"
    base_config_class = Gemma2Config
    model_class_name = "CLAGemma2ForCausalLM"


class CLAGemma2ForCausalLM(BaselineModel, Gemma2ForCausalLM):
    config_class = CLAGemma2Config


register_converted("gqa", GQAOPTConfig, GQAOPTForCausalLM, detect=_has_kv_attention)
for _config_class, _model_class in ((CLALlamaConfig, CLALlamaForCausalLM), (CLAOPTConfig, CLAOPTForCausalLM),
                                    (CLAGemma2Config, CLAGemma2ForCausalLM)):
    register_converted("cla", _config_class, _model_class, detect=_has_cla, includes=("gqa",))
