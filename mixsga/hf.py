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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from mixsga.attention import ATTN_NAME, BASE_IMPLEMENTATIONS
from mixsga.config import MixSGAConfig
from mixsga.convert import convert_to_mixsga

#: The remote-code module written beside a converted checkpoint (``auto_map`` points here).
SHIM_FILE = "converted_model.py"

_SHIM = '''"""Remote-code entry point of a {method} checkpoint saved by mixSGA-bench (model type "{model_type}").

It defines nothing: the classes come from the installed package, so
``trust_remote_code=True`` needs the mixSGA-bench repository installed (``pip install -e <checkout>``).
"""

from {module} import {config_class}, {model_class}  # noqa: F401
'''


def _auto_map(config_class: type) -> dict[str, str]:
    module = Path(SHIM_FILE).stem
    return {"AutoConfig": f"{module}.{config_class.__name__}",
            "AutoModelForCausalLM": f"{module}.{config_class.model_class_name}"}


class ConvertedConfig:
    """Mixed in before a family's config class; the subclass sets the class attributes.

    ``model_type`` (class attribute) is the converted type that ``config.json`` records and the
    Auto classes map; the instance attribute reads as the base architecture's (see module doc).
    """

    model_type: ClassVar[str]
    method: ClassVar[str]
    base_config_class: ClassVar[type]
    model_class_name: ClassVar[str]

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self.model_type = self.base_config_class.model_type
        self.auto_map = _auto_map(type(self))

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        # The shim first, so that a hub upload inside super().save_pretrained includes it.
        os.makedirs(save_directory, exist_ok=True)
        shim = _SHIM.format(method=self.method, model_type=type(self).model_type, module=type(self).__module__,
                            config_class=type(self).__name__, model_class=self.model_class_name)
        Path(save_directory, SHIM_FILE).write_text(shim)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """Deliberately a no-op.

        transformers' remote-code loader calls this on the class the shim imported; it would make
        every later ``save_pretrained`` copy this whole module beside the weights and point
        ``auto_map`` at the copy instead of at :data:`SHIM_FILE`.
        """


class ConvertedModel:
    """Mixed in before a family's causal-LM class: strict loading, no remote-code copying."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM") -> None:
        """Deliberately a no-op, as :meth:`ConvertedConfig.register_for_auto_class`."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, but a missing or unexpected weight is a ValueError.

        A converted checkpoint without, say, its routers would otherwise load with freshly
        initialised ones and score as a different model.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if missing or unexpected:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"checkpoint {where!r} does not match the {type(model).__name__} structure: "
                             f"missing {missing[:6]}, unexpected {unexpected[:6]}")
        return (model, info) if wants_info else model


@dataclass(frozen=True)
class _Method:
    name: str
    includes: tuple[str, ...]  # methods this one's rebuild subsumes (CLA rebuilds GQA first)
    detect: Callable[[nn.Module], bool]  # does this in-memory model carry the conversion?


_METHODS: dict[str, _Method] = {}
_CLASSES: dict[tuple[str, type], tuple[type, type]] = {}  # (method, base config class) -> (config, model)


def register_converted(method: str, config_class: type, model_class: type, *,
                       detect: Callable[[nn.Module], bool], includes: tuple[str, ...] = ()) -> None:
    """Register a converted config / model pair with the Auto classes and with :func:`mark_converted`."""
    if not (issubclass(config_class, ConvertedConfig) and issubclass(model_class, ConvertedModel)):
        raise TypeError("converted classes must mix in ConvertedConfig / ConvertedModel")
    if model_class.config_class is not config_class or config_class.method != method:
        raise TypeError(f"{model_class.__name__} / {config_class.__name__} do not belong together for {method!r}")
    _METHODS[method] = _Method(method, tuple(includes), detect)
    _CLASSES[(method, config_class.base_config_class)] = (config_class, model_class)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def converted_method(config) -> str | None:
    """The conversion a config records (``"mixsga"``, ``"gqa"``, ``"cla"``), or None for a plain config."""
    return type(config).method if isinstance(config, ConvertedConfig) else None


def _base_config_class(config) -> type:
    return type(config).base_config_class if isinstance(config, ConvertedConfig) else type(config)


def mark_converted(model: nn.Module, method: str) -> nn.Module:
    """Make ``model`` save (and reload) as a ``method`` checkpoint; called at the end of each conversion.

    Idempotent. A model already marked by a method whose rebuild includes ``method`` keeps its
    mark (GQA inside CLA); a mark that ``method`` includes is upgraded; any other combination is
    a ValueError, since no checkpoint type records both.
    """
    config = model.config
    current = converted_method(config)
    if current == method or (current is not None and method in _METHODS[current].includes):
        return model
    if current is not None and current not in _METHODS[method].includes:
        raise ValueError(f"a {current}-converted model cannot also be converted by {method}: "
                         "no checkpoint type records both")
    base_config = _base_config_class(config)
    if (method, base_config) not in _CLASSES:
        raise ValueError(f"no {method} checkpoint type for {base_config.__name__}")
    config_class, model_class = _CLASSES[(method, base_config)]
    config.__class__ = config_class
    config.model_type = base_config.model_type
    config.auto_map = _auto_map(config_class)
    # Only the family's own class (or a sibling converted class) is swapped: a user subclass keeps
    # its behaviour; its config still records the converted type, which is what loading reads.
    base_model = next(c for c in model_class.__mro__ if not issubclass(c, ConvertedModel))
    if type(model) is base_model or (isinstance(model, ConvertedModel) and isinstance(model, base_model)):
        model.__class__ = model_class
    return model


def check_savable(model: nn.Module) -> None:
    """ValueError unless every conversion ``model`` carries is recorded by its config's type."""
    method = converted_method(model.config)
    recorded = {method, *(_METHODS[method].includes if method else ())}
    carried = [m.name for m in _METHODS.values() if m.detect(model)]
    unrecorded = [m for m in carried if m not in recorded]
    if unrecorded:
        raise ValueError(f"{type(model).__name__} carries {unrecorded} conversion(s) that its config "
                         f"({type(model.config).__name__}) does not record; it would reload as a different model")


def save_converted(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Save a base or converted model (and ``tokenizer``) as a Hugging Face directory that reloads as itself.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` then returns the same model (with ``mixsga``
    or ``baselines`` imported, or with ``trust_remote_code=True``). Not atomic: callers that need
    that write into a temporary directory and rename it.
    """
    check_savable(model)
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


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
