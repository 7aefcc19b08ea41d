"""mixSGA: mixture of weight-shared heterogeneous group-attention experts (Song et al., EMNLP 2025).

Public API::

    from mixsga import MixSGAConfig, convert_to_mixsga, kv_budget
    cfg = MixSGAConfig(ratios=(3, 1, 6), group_sizes=(1, 2, 4))   # ratios normalised
    model = convert_to_mixsga(model, cfg)   # transformers Llama / OPT / Gemma2 causal LM, in place
    out = model(input_ids=ids, labels=ids)  # out.loss includes aux_loss_weight / L * sum of aux losses
    model.generate(ids, max_new_tokens=32)  # uses a MixSGACache (per-expert compact stores)
    kv_budget((3, 1, 6), (1, 2, 4))         # -> 0.5

* ``MixSGAConfig(ratios, group_sizes=(1, 2, 4), aux_loss_weight=0.1, aux_loss="sigmoid"|"softmax",
  router="learned"|"random", router_grad="none"|"straight_through", seed=0)``; ``.validate_for(model_config)``,
  ``.budget``, ``.to_dict()``. ``router_grad="straight_through"`` lets the LM loss train the router
  (a K/V gate that is exactly 1 forward; ``mixsga.routing.straight_through_gate``).
* ``convert_to_mixsga(model, cfg)``; ``load_mixsga(path, **from_pretrained_kwargs)`` reloads a
  converted model saved with ``model.save_pretrained(path)``.
* Checkpoints (``mixsga.hf``): a converted model saves as model type ``mixsga_llama`` /
  ``mixsga_opt`` / ``mixsga_gemma2``; importing ``mixsga`` registers them, so
  ``AutoModelForCausalLM.from_pretrained(path)`` returns the converted model (and
  ``trust_remote_code=True`` does without the import; plain transformers refuses).
  ``save_converted(model, out_dir, tokenizer=None)`` checks the conversion is recorded, then saves.
* ``MixSGACache(config, decode_backend="auto"|"torch"|"compiled"|"triton")``: preallocated
  per-expert stores and one batched decode step per layer (``mixsga.kernels``: torch, or the
  fused Triton kernel on CUDA); ``kv_bytes()`` (filled, = the ledger), ``reserved_bytes()``
  (allocated), ``expert_counts()``, ``expert_fractions()``,
  ``expert_index(layer, sample)``, ``num_tokens(sample)``, ``keep_tokens(keep, layer_idx=None, sample=0)``
  and ``set_observer(fn)`` (token-order attention probabilities at prefill and decode) for token
  eviction stacked on top; ``generate(..., past_key_values=MixSGACache(model.config))`` to keep it.
* ``mixsga.eviction.MixSGAEvictionCache(config, policy, rotate=None)``: H2O / StreamingLLM /
  SnapKV / TOVA (a ``baselines.eviction.EvictionPolicy``) stacked on mixSGA, byte-budgeted;
  ``harness.methods.get_method("h2o+mixsga")`` builds it.
* ``routing_stats(model)`` (prefill / decode expert fractions, argmax-vs-expert-choice agreement);
  ``model.mixsga_runtime``: ``.reset_stats()``, ``.last_aux_loss``, ``.force_routing(expert_ids)``.
* Ledger (``mixsga.budget``): ``kv_budget``, ``kv_shape``, ``dtype_bytes``, ``normalise_ratios``,
  ``full_kv_bytes_per_token``, ``grouped_kv_bytes_per_token``, ``mixsga_kv_bytes_per_token``,
  ``mixsga_kv_bytes_for_counts`` (exact bytes of a realised routing = ``MixSGACache.kv_bytes()``).

Module map: ``config`` (MixSGAConfig), ``routing`` (router, expert-choice, argmax, aux loss,
statistics), ``experts`` (head pooling), ``cache`` (MixSGACache), ``kernels`` (the batched decode
attention: torch reference and Triton kernel),
``attention`` (the registered ``"mixsga"`` attention and mask functions), ``convert``
(conversion, hooks, loading), ``budget`` (the ledger), ``eviction`` (token eviction on top),
``hf`` (checkpoint types, Auto-class registration, remote-code shim, ``save_converted``).
"""

from mixsga.budget import (
    full_kv_bytes_per_token,
    grouped_kv_bytes_per_token,
    kv_budget,
    mixsga_kv_bytes_for_counts,
    mixsga_kv_bytes_per_token,
)
from mixsga.cache import MixSGACache, MixSGALayer
from mixsga.config import MixSGAConfig
from mixsga.convert import convert_to_mixsga, load_mixsga, routing_stats
from mixsga.hf import save_converted  # registers the mixsga_<family> checkpoint types

__all__ = [
    "MixSGACache",
    "MixSGAConfig",
    "MixSGALayer",
    "convert_to_mixsga",
    "full_kv_bytes_per_token",
    "grouped_kv_bytes_per_token",
    "kv_budget",
    "load_mixsga",
    "mixsga_kv_bytes_for_counts",
    "mixsga_kv_bytes_per_token",
    "routing_stats",
    "save_converted",
]
