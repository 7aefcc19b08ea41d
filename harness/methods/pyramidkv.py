"""``pyramidkv``: token eviction with layer-wise budgets (PyramidKV, Cai et al., 2024).

Attention funnels from broad in the lower layers to a few tokens in the upper
ones, so PyramidKV gives the lower layers more of the cache and the upper ones
less, in an arithmetic sequence, at the same total. With ``L`` layers, keep
fraction ``k`` and ``beta``: the top layer keeps ``k / beta`` of the tokens, the
bottom one ``2k - k / beta``, the others on the line between (the paper's
``k^{m-1} = k / beta``, ``k^0 = 2k - k^{m-1}``). Which tokens a layer keeps is
the ``policy``'s choice (SnapKV's observation window by default, as in the
paper; any ``baselines.policies`` policy works).

Budget: after every forward pass a sample that saw ``n`` real tokens keeps
``T = floor(k * S)`` tokens over all layers, ``S`` the tokens the base model stores
over its layers (``n L`` without sliding windows; a sliding-window layer of Gemma 2
stores ``min(n, W - 1)``, ``kvledger.stored_tokens``), split by those weights (a
layer never keeps more than it stores; the excess goes to the other layers) and
rounded by largest remainder. The stored K/V is therefore ``T / S`` of the base
model's, exactly ``k`` whenever ``k * S`` is whole: the same total as uniform
eviction, redistributed. Runs on the base model's weights.
"""

from __future__ import annotations

import functools
import math

from harness.methods.core import ParamError
from harness.methods.eviction import POLICY_FIELDS, POLICY_STYLE, Redistributed, RedistributedSpec

DEFAULT_POLICY = "snapkv"
DEFAULT_BETA = 20.0


@functools.lru_cache(maxsize=4096)
def pyramid_allocation(seen: int, keep: float, beta: float, layers: int,
                       stored: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Tokens each layer keeps of ``seen``: ``floor(keep * sum(stored))`` in all, pyramid-shaped (module doc).

    ``stored``: per layer the tokens the base model stores of ``seen`` (None: ``seen`` on every layer).
    """
    caps = (seen,) * layers if stored is None else tuple(int(c) for c in stored)
    if len(caps) != layers:
        raise ValueError(f"need one stored-token count per layer: {len(caps)} for {layers} layers")
    total = math.floor(keep * sum(caps) + 1e-9)
    if layers == 1:
        return (min(total, caps[0]),)
    top = 1 / beta
    weights = [(2 - top) - (2 - 2 * top) * layer / (layers - 1) for layer in range(layers)]
    quota = [0.0] * layers
    open_layers, left = list(range(layers)), float(total)
    while open_layers:  # water-filling: a layer holds at most `seen` tokens, the rest goes to the others
        mass = sum(weights[i] for i in open_layers)
        share = {i: left * weights[i] / mass for i in open_layers}
        full = [i for i in open_layers if share[i] >= caps[i]]
        if not full:
            for i in open_layers:
                quota[i] = share[i]
            break
        for i in full:
            quota[i] = float(caps[i])
            left -= caps[i]
            open_layers.remove(i)
    counts = [min(caps[i], math.floor(q + 1e-9)) for i, q in enumerate(quota)]
    by_remainder = sorted(range(layers), key=lambda i: (-(quota[i] - counts[i]), i))
    for i in by_remainder:
        if sum(counts) >= total:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
    return tuple(counts)


class PyramidBudget:
    """Layer-wise token budgets for ``baselines.eviction.EvictionCache`` (its ``budget`` hook)."""

    def __init__(self, keep: float, beta: float, layers: int, windows=None):
        self.keep, self.beta, self.layers = float(keep), float(beta), int(layers)
        # per layer the tokens the base keeps on a sliding-window layer (kvledger.layer_windows), None: all
        self.windows = tuple(windows) if windows is not None else (None,) * self.layers

    def tokens(self, layer_idx: int, seen):
        """Tokens layer ``layer_idx`` keeps per sample (``seen``: real tokens per sample, a ``[B]`` tensor)."""
        import torch

        def stored(n: int) -> tuple[int, ...] | None:
            if all(w is None for w in self.windows):
                return None
            return tuple(n if w is None else min(n, w) for w in self.windows)

        kept = [pyramid_allocation(int(n), self.keep, self.beta, self.layers, stored(int(n)))[layer_idx]
                for n in seen.tolist()]
        return torch.tensor(kept, dtype=torch.long, device=seen.device)


class PyramidKVSpec(RedistributedSpec):
    name = "pyramidkv"
    label = "PyramidKV"
    color, marker = "tab:cyan", "P"
    knob = "beta"
    param_names = ("policy", "beta") + POLICY_FIELDS
    modules = ("harness.methods.pyramidkv",)

    def parse_params(self, params):
        params = super().parse_params(params)
        if params.get("policy", DEFAULT_POLICY) not in POLICY_STYLE:
            raise ParamError("policy", f"pyramidkv policy must be one of {list(POLICY_STYLE)}, "
                                       f"got {params['policy']!r}")
        beta = params.get("beta", DEFAULT_BETA)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 1:
            raise ParamError("beta", f"pyramidkv beta must be a number >= 1 (top layer keeps keep / beta), "
                                     f"got {beta!r}")
        return params

    def implementation(self):
        return PyramidKV(self)


class PyramidKV(Redistributed):
    """A policy's eviction (``harness.methods.eviction``) with :class:`PyramidBudget` layer budgets."""

    default_knob = DEFAULT_BETA

    def cache_hooks(self, config, params):
        from kvledger import kv_shape, layer_windows

        keep, layers = float(params["eviction"]["keep"]), kv_shape(config).num_layers
        return {"budget": PyramidBudget(keep, params["beta"], layers, windows=layer_windows(config))}


SPECS = (PyramidKVSpec(),)
