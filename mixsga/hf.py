"""Converted checkpoints that say what they are, for every Hugging Face tool.

A converted model saved with ``model.save_pretrained(dir)`` is a normal Hugging Face
directory (safetensors, ``config.json``, generation config, tokenizer files when saved)
whose config names the conversion's **own model type**, ``"<method>_<family>"``:

=============================  ==========================================================
model type                     what the checkpoint is
=============================  ==========================================================
``mixsga_llama`` / ``_opt`` /  mixSGA (routers, expert groups, ``config.mixsga``) on a
``_gemma2``                    Llama / OPT / Gemma 2 causal LM (:mod:`mixsga.hf`)
``gqa_opt``                    GQA / MQA on OPT, which transformers' OPT cannot express
                               (:mod:`baselines.hf`)
``cla_llama`` / ``_opt`` /     cross-layer K/V sharing, optionally with GQA inside
``_gemma2``                    (:mod:`baselines.hf`)
=============================  ==========================================================

GQA / MQA on Llama and Gemma 2 is native to transformers and stays a plain checkpoint.

How each loader treats such a directory:

* ``import mixsga`` (or ``import baselines``) registers the types with ``AutoConfig`` /
  ``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` returns the
  converted model (same logits as :func:`mixsga.load_mixsga` / :func:`baselines.load_converted`,
  which now delegate to it). Loading is strict: a missing or unexpected weight is a
  ``ValueError``, not a silently random router.
* Plain transformers without the import refuses: the config carries an ``auto_map``, so
  ``AutoModelForCausalLM.from_pretrained(dir)`` raises ``ValueError`` ("... contains custom
  code which must be executed to correctly load the model ... pass the argument
  `trust_remote_code=True`"), after an interactive y/N prompt when run in a terminal.
* ``trust_remote_code=True`` without any import: ``auto_map`` points at
  ``converted_model.py`` (:data:`SHIM_FILE`) saved beside the weights, a two-line module that
  imports the classes from the installed package (``pip install -e <mixSGA-bench checkout>``);
  without the package installed it fails with transformers' "requires the following
  packages that were not found in your environment: mixsga".
* Naming the base class explicitly (``LlamaForCausalLM.from_pretrained(dir)``) is the one
  route transformers cannot be made to refuse: it warns "You are using a model of type
  `mixsga_llama` to instantiate a model of type `llama`" and loads the base model.

In memory ``config.model_type`` still reads as the base architecture's (``"llama"``, as
transformers' own ``from_dict`` stores it), so code keyed on the family (bias handling,
family checks) is unaffected; the converted type is ``type(config).model_type``, which is
what ``config.json`` records and what the Auto classes map.

The conversions mark a model at their end (:func:`mark_converted`): its config becomes the
converted config class and, when it is exactly the family's transformers class, the model
becomes the converted model class (a subclass that adds nothing but loading). A converted
model class rebuilds the conversion in ``__init__`` from the config, so ``from_pretrained``
and ``from_config`` produce the converted structure before the weights are loaded.

:func:`save_converted` is the one call for trainers: it refuses a model whose conversion
would not be recorded, then saves model and tokenizer.
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

from hfconvert import (  # noqa: F401 - re-exported: mixsga.hf is the documented entry point
    SHIM_FILE,
    ConvertedConfig,
    ConvertedModel,
    check_savable,
    converted_method,
    mark_converted,
    register_converted,
    save_converted,
)
from mixsga.attention import ATTN_NAME, BASE_IMPLEMENTATIONS
from mixsga.config import MixSGAConfig
from mixsga.convert import convert_to_mixsga

# ---------------------------------------------------------------------------------------------
# mixSGA: one config / model pair per family.


class MixSGAModel(ConvertedModel):
    """Rebuilds the mixSGA conversion from ``config.mixsga`` right after the base model is built."""

    def __init__(self, config, *args, **kwargs) -> None:
        spec = getattr(config, "mixsga", None)
        if not isinstance(spec, dict):
            raise ValueError(f"{type(self).__name__} needs a config with a `mixsga` entry (a converted model's)")
        # The base attention the conversion ran on, unless the caller asked for another one
        # (from_pretrained(..., attn_implementation="eager")). "mixsga" itself is not a base.
        requested = config._attn_implementation
        if requested in (None, ATTN_NAME):
            requested = spec.get("base_attn_implementation", "sdpa")
        if requested not in BASE_IMPLEMENTATIONS:
            raise ValueError(f"mixSGA runs on {BASE_IMPLEMENTATIONS} attention, not {requested!r}")
        config._attn_implementation = requested
        super().__init__(config, *args, **kwargs)
        convert_to_mixsga(self, MixSGAConfig.from_dict(spec))


def _has_mixsga(model: nn.Module) -> bool:
    return hasattr(model, "mixsga_runtime")


class MixSGALlamaConfig(ConvertedConfig, LlamaConfig):
    model_type = "mixsga_llama"
    method = "mixsga"
    base_config_class = LlamaConfig
    model_class_name = "MixSGALlamaForCausalLM"


class MixSGALlamaForCausalLM(MixSGAModel, LlamaForCausalLM):
    config_class = MixSGALlamaConfig


class MixSGAOPTConfig(ConvertedConfig, OPTConfig):
    model_type = "mixsga_opt"
    method = "mixsga"
    base_config_class = OPTConfig
    model_class_name = "MixSGAOPTForCausalLM"


class MixSGAOPTForCausalLM(MixSGAModel, OPTForCausalLM):
    config_class = MixSGAOPTConfig


class MixSGAGemma2Config(ConvertedConfig, Gemma2Config):
    model_type = "mixsga_gemma2"
    method = "mixsga"
    base_config_class = Gemma2Config
    model_class_name = "MixSGAGemma2ForCausalLM"


class MixSGAGemma2ForCausalLM(MixSGAModel, Gemma2ForCausalLM):
    config_class = MixSGAGemma2Config


for _config_class, _model_class in ((MixSGALlamaConfig, MixSGALlamaForCausalLM),
                                    (MixSGAOPTConfig, MixSGAOPTForCausalLM),
                                    (MixSGAGemma2Config, MixSGAGemma2ForCausalLM)):
    register_converted("mixsga", _config_class, _model_class, detect=_has_mixsga)
