"""Checkpoints that name their own model type: the machinery every converted method shares.

A conversion (mixSGA in :mod:`mixsga.hf`, GQA-on-OPT and CLA in :mod:`baselines.hf`) registers a
config / model class pair per family with :func:`register_converted` and marks a converted model
with :func:`mark_converted`; ``save_pretrained`` then writes a Hugging Face directory whose
``config.json`` names the converted type and whose ``auto_map`` points at a two-line shim saved
beside the weights. :mod:`mixsga.hf` documents how each loader treats such a directory. Its own
package because both method packages need it and neither imports the other; it imports only
torch and transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hfconvert.softcap_attention import ATTN_NAME as SOFTCAP_FUSED

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
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except Exception as exc:  # safetensors, torch and transformers each raise their own types
            if "safetensor" not in type(exc).__module__.lower() and "safetensor" not in str(exc).lower():
                raise
            raise ValueError(f"cannot read the weights of checkpoint {str(where)!r} "
                             f"(truncated or not safetensors?): {exc}") from exc
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if missing or unexpected:
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
    record_attention(model.config, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


#: Attention kernels a plain checkpoint's ``config.json`` records (the ones every install has).
RECORDED_ATTENTION = ("eager", "sdpa")
#: Kernels the suite runs that other tools know by another name: the fused soft-capped kernel
#: computes transformers' Gemma 2 eager attention, so checkpoints record "eager".
RECORDED_AS = {SOFTCAP_FUSED: "eager"}


def recorded_attention(kernel: str | None) -> str | None:
    """The name a saved ``config.json`` records for ``kernel``; None when it records none."""
    kernel = RECORDED_AS.get(kernel, kernel)
    return kernel if kernel in RECORDED_ATTENTION else None


def record_attention(config, out_dir: str | os.PathLike) -> None:
    """Write the attention kernel a plain model ran with into its saved ``config.json``.

    transformers does not save it, and a plain Gemma 2 checkpoint reloaded with its sdpa default
    would silently drop the attention-logit soft-capping that eager applies (the suite runs Gemma 2
    on eager, or on its fused equivalent, which is recorded as "eager"). ``from_pretrained`` reads the key back as its ``attn_implementation`` argument, so
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` runs the kernel the suite ran; an explicit
    argument still wins. Converted configs record their kernel themselves (``mixsga``: its base
    kernel in ``config.mixsga``; the baselines' configs in ``to_dict``), so they are left alone.
    """
    kernel = recorded_attention(getattr(config, "_attn_implementation", None))
    if converted_method(config) is not None or kernel is None:
        return
    path = Path(out_dir) / "config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("attn_implementation") == kernel:
        return
    saved["attn_implementation"] = kernel
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["SHIM_FILE", "ConvertedConfig", "ConvertedModel", "check_savable", "converted_method", "mark_converted",
           "record_attention", "recorded_attention", "register_converted", "save_converted"]
