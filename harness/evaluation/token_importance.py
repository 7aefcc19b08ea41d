"""Figure 1 of the paper: how much one token loses when its K/V alone is averaged across heads.

For one held-out sequence and each position ``t`` in turn, token ``t``'s key and
value states are replaced, at every layer, by their mean over the layer's K/V
heads (multi-query attention for that one token; every other token keeps its
full K/V, computed from whatever hidden states it now has), and the whole
sequence's perplexity is compared with the unmodified one:
``delta_pct[t] = 100 * (ppl_t / ppl_base - 1)``.

The perturbation lives in an attention function registered with transformers'
``AttentionInterface`` (``"token_mqa"``): it sees each layer's K/V exactly as the
attention does (after RoPE, biases and any norm), averages the perturbed token's
heads, and calls the model's own eager or sdpa attention. Many positions run in
one batch, one sequence copy per perturbed position.

The sequence's last token is not perturbed: its K/V feeds no scored prediction
(it is only a target), so its change is zero by construction.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from mixsga.attention import BASE_IMPLEMENTATIONS, base_attention

ATTN_NAME = "token_mqa"

#: Thresholds (in percent) for the ``fraction_above`` summary.
FRACTION_THRESHOLDS = (0.01, 0.1, 1.0, 5.0)


@dataclass
class _Perturbation:
    """What the attention function needs: the base attention and the batch's perturbed positions."""

    base_fn: Callable
    positions: torch.Tensor | None = None  # [batch], -1 = leave this row alone


def mean_heads_at(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``states`` ``[B, H, L, d]`` with row b's token ``positions[b]`` replaced by its mean over the H heads.

    Rows with ``positions[b] < 0`` are returned unchanged.
    """
    rows = (positions >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return states
    cols = positions[rows].to(states.device)
    rows = rows.to(states.device)
    out = states.clone()
    picked = states[rows, :, cols, :]  # [n, H, d]
    out[rows, :, cols, :] = picked.mean(dim=1, keepdim=True).expand_as(picked)
    return out


def token_mqa_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs):
    """The model's own attention, with the perturbed tokens' K/V averaged over heads."""
    spec: _Perturbation = module.token_mqa
    if spec.positions is not None:
        if spec.positions.shape[0] != key.shape[0]:
            raise ValueError(f"{spec.positions.shape[0]} perturbed positions for a batch of {key.shape[0]}")
        key = mean_heads_at(key, spec.positions)
        value = mean_heads_at(value, spec.positions)
    return spec.base_fn(module, query, key, value, attention_mask, **kwargs)


def _token_mqa_mask(*args, config=None, **kwargs):
    """The mask the base attention implementation expects."""
    return ALL_MASK_ATTENTION_FUNCTIONS[config.token_mqa_base](*args, config=config, **kwargs)


AttentionInterface.register(ATTN_NAME, token_mqa_attention)
AttentionMaskInterface.register(ATTN_NAME, _token_mqa_mask)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no `self_attn` modules")
    return mods


@contextlib.contextmanager
def token_mqa(model) -> Iterator[Callable[[torch.Tensor | None], None]]:
    """Run ``model`` with the ``"token_mqa"`` attention; yields ``set_positions(positions)``.

    ``positions`` is a ``[batch]`` LongTensor (``-1``: unperturbed row) or None (no
    perturbation). The model's attention implementation is restored on exit.
    """
    config = model.config
    base = config._attn_implementation
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"token importance needs an unconverted model with {BASE_IMPLEMENTATIONS} attention; "
                         f"this one uses {base!r}")
    modules = _attention_modules(model)
    specs = [_Perturbation(base_attention(m, base)) for m in modules]

    def set_positions(positions: torch.Tensor | None) -> None:
        for spec in specs:
            spec.positions = positions

    try:
        for module, spec in zip(modules, specs):
            module.token_mqa = spec
        config.token_mqa_base = base
        model.set_attn_implementation(ATTN_NAME)
        yield set_positions
    finally:
        model.set_attn_implementation(base)
        if hasattr(config, "token_mqa_base"):
            del config.token_mqa_base
        for module in modules:
            if hasattr(module, "token_mqa"):
                del module.token_mqa


def _sequence_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats, float64) of each row of ``ids`` ``[B, L]``."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).sum(dim=1, dtype=torch.float64)


@torch.inference_mode()
def token_importance(
    model,
    ids: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = 32,
    positions: Sequence[int] | None = None,
) -> dict:
    """Per-position change of sequence perplexity when that one token's K/V is averaged over heads.

    Returns ``{"base_ppl", "positions", "ppl", "delta_pct"}`` (lists aligned with
    ``positions``; by default every position but the last).
    """
    seq = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    length = seq.numel()
    if length < 2:
        raise ValueError(f"need a sequence of at least 2 tokens, got {length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if positions is None:
        positions = range(length - 1)
    positions = [int(p) for p in positions]
    bad = [p for p in positions if not 0 <= p < length]
    if bad:
        raise ValueError(f"positions {bad[:5]} lie outside the sequence of {length} tokens")
    device = next(model.parameters()).device
    seq = seq.to(device)
    was_training = model.training
    model.eval()
    scored = length - 1
    try:
        with token_mqa(model) as set_positions:
            set_positions(None)
            base_nll = float(_sequence_nll(model, seq[None])[0])
            nlls: list[float] = []
            for start in range(0, len(positions), batch_size):
                chunk = torch.tensor(positions[start : start + batch_size], dtype=torch.long)
                set_positions(chunk)
                nlls.extend(_sequence_nll(model, seq.expand(len(chunk), -1)).tolist())
    finally:
        model.train(was_training)
    base_ppl = math.exp(base_nll / scored)
    ppl = [math.exp(n / scored) for n in nlls]
    return {
        "base_ppl": base_ppl,
        "positions": positions,
        "ppl": ppl,
        "delta_pct": [100.0 * (p / base_ppl - 1.0) for p in ppl],
    }


def summarise_deltas(delta_pct: Sequence[float], thresholds: Sequence[float] = FRACTION_THRESHOLDS) -> dict:
    """Mean, median, p90, max, min, std of the changes, and the fraction of positions above each threshold (%)."""
    values = sorted(float(d) for d in delta_pct)
    if not values:
        raise ValueError("no deltas to summarise")
    p90 = values[min(len(values) - 1, max(0, round(0.9 * (len(values) - 1))))]
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": p90,
        "max": values[-1],
        "min": values[0],
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "fraction_negative": sum(v < 0 for v in values) / len(values),
        "fraction_above": {f"{t:g}": sum(v > t for v in values) / len(values) for t in thresholds},
    }


def pick_sequence(
    tokenizer, texts: Sequence[str], *, seq_tokens: int = 256, doc_index: int = 0
) -> tuple[list[int], int]:
    """``(ids, doc)``: ``<bos>`` + the first ``seq_tokens - 1`` tokens of document ``doc``.

    ``doc`` is the first document from ``doc_index`` on that has enough tokens.
    """
    if seq_tokens < 2:
        raise ValueError(f"seq_tokens must be >= 2, got {seq_tokens!r}")
    if not 0 <= doc_index < len(texts):
        raise ValueError(f"doc_index {doc_index!r} outside the {len(texts)} documents")
    if tokenizer.bos_token_id is None:
        raise ValueError("tokenizer needs a bos token to start the sequence")
    for doc in range(doc_index, len(texts)):
        body = tokenizer(texts[doc], add_special_tokens=False, verbose=False)["input_ids"]
        if len(body) >= seq_tokens - 1:
            return [tokenizer.bos_token_id, *body[: seq_tokens - 1]], doc
    raise ValueError(f"no document from index {doc_index} on has {seq_tokens - 1} tokens; lower seq_tokens")


def figure1(
    model_path: str,
    *,
    text_set: str = "stdlib",
    text_path: str | None = None,
    split: str = "test",
    seq_tokens: int = 256,
    doc_index: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """The JSON-ready Figure 1 result for the model at ``model_path`` on one held-out sequence.

    ``text_set`` / ``text_path`` / ``split`` go to ``harness.data.hub_data.load_text_set``
    (offline: ``"stdlib"`` with the corpus directory; paper profile: ``"wikitext2"``).
    """
    from harness.data.hub_data import load_text_set
    from harness.models.zoo import family_of, load_base_model

    model, tokenizer = load_base_model(model_path, dtype=dtype, device=device)
    texts = load_text_set(text_set, text_path, split)
    ids, doc = pick_sequence(tokenizer, texts, seq_tokens=seq_tokens, doc_index=doc_index)
    result = token_importance(model, ids, batch_size=batch_size)
    return {
        "figure": "figure1_token_importance",
        "model": str(model_path),
        "family": family_of(model.config),
        "text_set": text_set,
        "split": split,
        "doc_index": doc,
        "sequence_tokens": len(ids),
        "base_ppl": result["base_ppl"],
        "positions": result["positions"],
        "delta_pct": result["delta_pct"],
        "ppl": result["ppl"],
        "token_ids": [ids[p] for p in result["positions"]],
        "tokens": [tokenizer.decode([ids[p]]) for p in result["positions"]],
        "summary": summarise_deltas(result["delta_pct"]),
        "protocol": "per position t < L-1: token t's K and V (every layer, after RoPE) replaced by their mean over "
                    "the layer's K/V heads; delta_pct = 100 * (ppl_t / ppl_base - 1), ppl over the L-1 predictions",
        "dtype": dtype,
        "device": device,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from harness.atomic import write_json_atomic

    parser = argparse.ArgumentParser(prog="python -m harness.evaluation.token_importance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="checkpoint directory (e.g. work/models/llama3/base) or hub name")
    parser.add_argument("--text-set", default="stdlib", help="stdlib (offline corpus) or wikitext2")
    parser.add_argument("--text-path", default=None, help="corpus directory / local data (see load_text_set)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seq-tokens", type=int, default=256)
    parser.add_argument("--doc-index", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True, help="output JSON path")
    args = parser.parse_args(argv)
    from harness.allocator import tune_allocator

    tune_allocator()  # as every harness job (harness.allocator)
    result = figure1(args.model, text_set=args.text_set, text_path=args.text_path, split=args.split,
                     seq_tokens=args.seq_tokens, doc_index=args.doc_index, batch_size=args.batch_size,
                     device=args.device, dtype=args.dtype)
    write_json_atomic(args.out, result)
    s = result["summary"]
    print(f"{result['family']}: base ppl {result['base_ppl']:.3f}; delta % mean {s['mean']:.4f} median "
          f"{s['median']:.4f} p90 {s['p90']:.4f} max {s['max']:.4f} min {s['min']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
