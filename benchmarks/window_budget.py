"""Realized against nominal KV budget on the zoo Gemma 2 at a context beyond its sliding window.

Measures what the runs measure (``harness.measurement.footprint.measure_cache_bytes``: a
greedy generation after the prompt, the method's live bytes over the base model's
``DynamicCache`` bytes for the same tokens) on a randomly initialised zoo model (no
training: mixSGA's router is freshly initialised, so its decode routing is untrained
argmax), and prints the ledger's figure beside it::

    python -m benchmarks.window_budget --context 128 --new-tokens 16

or on a workflow's own models (``--work``: its ``work`` directory; the base model, the
trained ``gemma2__cpt__mixsga__kv50__s0`` checkpoint and the corpus's test split as the
prompt)::

    python -m benchmarks.window_budget --work work --context 128 --new-tokens 16

The ledger column is ``Method.analytic_bytes`` over ``kvledger.base_kv_bytes`` at the
stored token count: both count only the window on sliding-window layers.
"""

from __future__ import annotations

import argparse
import copy

import torch

DEFAULT_METHODS = ("mixsga", "h2o", "snapkv", "streamingllm", "tova", "pyramidkv", "adakv")


class _Tokenizer:
    """The few tokenizer facts ``harness.models.zoo.build_config`` reads (no vocabulary is needed)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def measure(context: int, new_tokens: int, budget: float, methods, size: str = "tiny", seed: int = 0,
            work: str | None = None) -> list[dict]:
    """One row per method: nominal, realized (measured / base measured) and ledger budget.

    ``work``: a workflow's work directory; the base model, mixSGA's trained CPT checkpoint at
    this budget and a prompt from the corpus's test split come from it.
    """
    from pathlib import Path

    from harness.measurement.footprint import measure_cache_bytes, prompt_ids
    from harness.methods import get_method
    from harness.models.zoo import build_config, load_base_model
    from kvledger import base_kv_bytes, layer_windows
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(seed)
    trained: dict[str, Path] = {}
    if work is None:
        config = build_config("gemma2", size, _Tokenizer(512))
        base = Gemma2ForCausalLM(config).eval()
        prompt = torch.randint(3, 512, (1, context), generator=torch.Generator().manual_seed(seed))
    else:
        from harness.data.corpus import read_split

        root = Path(work)
        base, tokenizer = load_base_model(root / "models" / "gemma2" / "base", dtype=torch.float32, device="cpu")
        base.eval()
        config = base.config
        prompt = prompt_ids(tokenizer, read_split(root / "data" / "corpus", "test"), context)
        trained = {"mixsga": root / "trained"}
    windows = [w for w in layer_windows(config) if w is not None]
    if not windows or context <= min(windows):
        raise ValueError(f"context {context} does not exceed the sliding window ({config.sliding_window})")
    tokens = context + new_tokens - 1  # the last generated token is never stored
    base_method = get_method("base")
    with torch.no_grad():
        base_bytes = measure_cache_bytes(base, base_method, {}, prompt, new_tokens)
    assert base_bytes == base_kv_bytes(config, tokens), "the base cache does not store what the ledger says"
    rows = []
    for name in methods:
        method = get_method(name)
        params = method.params_for_budget(config, budget)
        inner = name.split("+")[-1]
        if inner in trained:  # the trained weights (a stacked method prepares them for its own cache)
            kv = f"kv{float(params.get('inner_budget', budget)) * 100:g}"
            path = trained[inner] / f"gemma2__cpt__{inner}__{kv}__s{seed}"
            model, _ = method.load_trained(path, params, dtype=torch.float32, device="cpu")
            model.eval()
        else:
            model = method.apply(copy.deepcopy(base), params).eval()
        with torch.no_grad():
            measured = measure_cache_bytes(model, method, params, prompt, new_tokens)
        ledger = method.analytic_bytes(config, params, tokens) / base_kv_bytes(config, tokens)
        rows.append({"method": name, "nominal": budget, "realized": measured / base_bytes, "ledger": ledger,
                     "measured_bytes": measured, "base_bytes": base_bytes})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--work", default=None, help="a workflow work directory: its trained models and corpus")
    args = parser.parse_args(argv)
    rows = measure(args.context, args.new_tokens, args.budget, args.methods, args.size, work=args.work)
    source = f"models of {args.work}" if args.work else f"zoo gemma2 {args.size}, random init"
    print(f"{source}, context {args.context} + {args.new_tokens} generated")
    print(f"{'method':<14}{'nominal':>9}{'realized':>10}{'ledger':>9}{'bytes':>11}{'base bytes':>12}")
    for r in rows:
        print(f"{r['method']:<14}{r['nominal']:>9.3f}{r['realized']:>10.4f}{r['ledger']:>9.4f}"
              f"{r['measured_bytes']:>11}{r['base_bytes']:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
