"""``adakv``: token eviction with head-wise budgets (Ada-KV, Feng et al., 2024).

Uniform eviction gives every K/V head of a layer the same ``cap`` tokens. Heads
differ, though: one concentrates its attention on a few tokens, another spreads
it, so AdaKV keeps the layer's total, ``kv_heads x cap`` per sample, and lets
the heads compete for it: the kept slots are a top-k over all heads' scores at
once (a flattened top-k), so a head with peaked scores gives budget to one whose
mass is spread out. A safeguard floor keeps each head's own best
``floor(alpha x cap)`` slots whatever the others score (kvpress's
``alpha_safeguard``; AdaKV's ``floor_alpha``, 0.2 by default); ``alpha = 1`` is
uniform eviction exactly.

The scores are the ``policy``'s (SnapKV's observation window by default, as in
the paper's Ada-SnapKV; H2O's accumulated attention also works). Its protection
tiers rank above any score in every head, as they do for the policy alone
(SnapKV's window, H2O's recent tokens, a protected question). TOVA averages its
scores over heads and StreamingLLM ranks by position, so neither has per-head
scores to allocate by; both are refused.

Storage: heads keep different token counts, so the cache
(``baselines.eviction.PackedEvictionLayer``) stores each layer's kept K/V
packed, ``[N, head_dim]`` over all samples and heads, with per-head lengths;
nothing is padded. After every forward pass a sample that saw ``n`` real tokens
stores ``kv_heads x floor(keep x n)`` tokens in every full-attention layer,
exactly uniform eviction's total: live bytes equal ``keep`` x the base model's
whenever ``keep x n`` is whole. Runs on the base model's weights.
"""

from __future__ import annotations

from harness.methods.core import ParamError
from harness.methods.eviction import POLICY_FIELDS, Redistributed, RedistributedSpec

DEFAULT_POLICY = "snapkv"
DEFAULT_ALPHA = 0.2
#: Policies with a score of their own in every K/V head (what the flattened top-k compares).
HEAD_SCORED = ("snapkv", "h2o")


class AdaptiveHeads:
    """Head-wise budgets for ``baselines.eviction.EvictionCache`` (its ``heads`` hook; ``EqualHeads`` API)."""

    ragged = True  # heads keep different counts: the cache stores them packed

    def __init__(self, alpha: float):
        if not 0 <= float(alpha) <= 1:
            raise ValueError(f"adakv alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def select(self, policy, score, valid, slots, cap, prompt_end):
        """Keep mask ``[B, H, S]``: each head's best ``floor(alpha cap)``, then the best of all heads (``H cap``)."""
        import torch

        tier, value = policy.priority(score, valid, slots, cap, prompt_end)
        floor = torch.floor(cap.double() * self.alpha + 1e-9).long()
        own = policy.order(tier, value)  # each head's own preference order
        tier = torch.where(valid & (own < floor), int(tier.max()) + 1, tier)  # the safeguard ranks first
        bsz, heads, width = tier.shape
        flat = policy.order(tier.reshape(bsz, 1, heads * width), value.reshape(bsz, 1, heads * width))
        return valid & (flat.reshape(bsz, heads, width) < heads * cap)


class AdaKVSpec(RedistributedSpec):
    name = "adakv"
    label = "AdaKV"
    color, marker = "goldenrod", "h"
    knob = "alpha"
    param_names = ("policy", "alpha") + POLICY_FIELDS
    modules = ("harness.methods.adakv",)

    def parse_params(self, params):
        params = super().parse_params(params)
        policy = params.get("policy", DEFAULT_POLICY)
        if policy not in HEAD_SCORED:
            raise ParamError("policy", f"adakv policy must be one of {list(HEAD_SCORED)} (a score per K/V head to "
                                       f"allocate by), got {policy!r}")
        alpha = params.get("alpha", DEFAULT_ALPHA)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ParamError("alpha", f"adakv alpha must be a number in [0, 1] (each head's guaranteed share of the "
                                      f"uniform budget), got {alpha!r}")
        return params

    def implementation(self):
        return AdaKV(self)


class AdaKV(Redistributed):
    """A policy's eviction (``harness.methods.eviction``) with :class:`AdaptiveHeads` head budgets."""

    query_aware = True  # both allowed policies select by queries' attention
    default_knob = DEFAULT_ALPHA

    def cache_hooks(self, config, params):
        return {"heads": AdaptiveHeads(params["alpha"])}


SPECS = (AdaKVSpec(),)
