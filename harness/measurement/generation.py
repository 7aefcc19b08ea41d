"""Generate exactly N tokens with a method's cache: the one helper runs, overheads and benchmarks share."""

from __future__ import annotations

from typing import Any

import torch


def generate_exactly(model, prompt: torch.Tensor, n: int, *, cache: Any = None,
                     attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None, **kwargs):
    """Greedy ``generate`` of exactly ``n`` new tokens (``min_new_tokens = max_new_tokens = n``).

    ``cache`` (a method's ``new_cache`` or a copy of a prefilled one) is passed as
    ``past_key_values``; ``None`` lets the model build its default cache. Returns the
    ``generate`` output with ``return_dict_in_generate=True`` (``.sequences``,
    ``.past_key_values``). Raises if the model stopped early: a timing or byte count over
    fewer tokens than asked would be silently wrong.
    """
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt)
    extra = {} if cache is None else {"past_key_values": cache}
    options = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_token_id,
                   return_dict_in_generate=True)
    options.update(kwargs)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=attention_mask, **options, **extra)
    got = out.sequences.shape[1] - prompt.shape[1]
    if got != n:
        raise RuntimeError(f"generated {got} tokens, wanted {n}")
    return out
