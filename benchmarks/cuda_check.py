"""CUDA smoke check of mixSGA's decode path (run on a GPU machine; CI has none).

* incremental decoding through the compact cache equals a full forward under the
  routing the cache realised (fp32, tiny TinyLlama-shaped model, batch 2);
* H2O stacked on mixSGA generates and compresses on the GPU;
* a bf16 mixSGA model generates;
* the decode backends agree on CUDA: the fused Triton kernel (the default there when
  Triton is installed), eager torch and ``torch.compile`` give the same tokens, and
  logits within fp32 (bf16) rounding.

``PYTHONPATH=. python3 benchmarks/cuda_check.py`` prints ``CUDA CHECK OK`` or raises.
"""

from __future__ import annotations

import torch

from baselines.testing import tiny_model
from harness.methods import get_method
from mixsga import MixSGACache, MixSGAConfig, convert_to_mixsga


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    dev = torch.device("cuda")
    model = convert_to_mixsga(tiny_model("tinyllama"), MixSGAConfig(ratios=(3, 1, 6))).to(dev)
    ids = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(5)).to(dev)
    cache = MixSGACache(model.config)
    print(f"decode backend on cuda: {cache.layers[0].decode_backend} -> resolved at first use")
    with torch.no_grad():
        outs = [model(input_ids=ids[:, :6], past_key_values=cache, use_cache=True).logits]
        for t in range(6, 14):
            outs.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        layers = model.config.num_hidden_layers
        routing = torch.stack(
            [torch.stack([cache.expert_index(layer, b).long() for b in range(2)]) for layer in range(layers)]
        )
        with model.mixsga_runtime.force_routing(routing):
            full = model(input_ids=ids, use_cache=False).logits
    diff = (torch.cat(outs, 1) - full).abs().max().item()
    print(f"cuda incremental vs full forward: max abs diff {diff:.2e}")
    if diff > 1e-4:
        raise AssertionError(f"incremental decoding differs from the full forward by {diff}")

    method = get_method("h2o+mixsga")
    base = tiny_model("llama")
    params = method.params_for_budget(base.config, 0.25)
    stacked = method.apply(base, params).to(dev)
    evicting = method.new_cache(stacked, params)
    with torch.no_grad():
        stacked.generate(ids, past_key_values=evicting, max_new_tokens=5, do_sample=False, pad_token_id=0)
    print(f"h2o+mixsga on cuda: kept tokens {evicting.kept_tokens()}, {method.live_bytes(evicting)} bytes "
          f"(plain mixSGA would hold {evicting.uncompressed_bytes()})")
    if not method.live_bytes(evicting) <= 0.5 * evicting.uncompressed_bytes():
        raise AssertionError("eviction on mixSGA exceeded keep x the plain mixSGA bytes")

    bf16 = convert_to_mixsga(tiny_model("llama"), MixSGAConfig(ratios=(3, 1, 6))).to(dev, torch.bfloat16)
    with torch.no_grad():
        out = bf16.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 18)

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        m = convert_to_mixsga(tiny_model("tinyllama"), MixSGAConfig(ratios=(3, 1, 6))).to(dev, dtype)
        got = {}
        for backend in ("torch", "triton", "compiled"):
            with torch.no_grad():
                got[backend] = m.generate(
                    ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                    past_key_values=MixSGACache(m.config, decode_backend=backend),
                    return_dict_in_generate=True, output_logits=True,
                )
        ref = torch.stack(got["torch"].logits).float()
        for backend in ("triton", "compiled"):
            d = (torch.stack(got[backend].logits).float() - ref).abs().max().item()
            print(f"{dtype} decode backend {backend} vs torch: max abs logit diff {d:.2e}")
            if d > tol:
                raise AssertionError(f"{backend} decode differs from torch by {d} in {dtype}")
    print("CUDA CHECK OK")


if __name__ == "__main__":
    main()
