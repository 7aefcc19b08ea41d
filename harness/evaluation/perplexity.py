"""Held-out perplexity, per token and per word, and the unigram baseline of the same tokens.

Protocol (shared by the model and the unigram baseline so that the two are comparable):

* Each document becomes ``<bos> tokens <eos>`` and the documents are concatenated into one
  stream (optionally cut to its first ``max_tokens`` tokens).
* The stream is scored in non-overlapping windows of ``seq_len`` predictions: window ``i``
  feeds tokens ``[i*L, (i+1)*L)`` and predicts ``[i*L+1, (i+1)*L+1)``, so every token after the
  first is predicted exactly once and the context restarts at each window (the standard
  non-overlapping protocol; a strided evaluation would give lower numbers at higher cost).
* Targets that are ``<bos>`` are not scored (a ``<bos>`` always follows ``<eos>``, so it would
  flatter the model); ``<eos>`` targets are scored (ending a document is a real prediction).
* Per-word perplexity divides the same negative log-likelihood by the number of
  whitespace-separated words of the scored text (as lm-evaluation-harness does).
* Each window's summed NLL and scored-target count are returned too (``window_nll``,
  ``window_tokens``, in stream order): the windows are the units scored independently (the
  context restarts at each), which ``analysis.stats`` resamples for a paired bootstrap between
  two runs scored on the same stream.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm


def token_stream(tokenizer, texts: Sequence[str], *, max_tokens: int | None = None) -> tuple[list[int], int]:
    """``(ids, words)``: documents as ``<bos> tokens <eos>`` back to back, and the word count of that text.

    With ``max_tokens`` the stream stops after that many tokens; the last document's words are
    counted on the decoded part that made it in.
    """
    ids, words, _ = document_stream(tokenizer, texts, max_tokens=max_tokens)
    return ids, words


def document_stream(tokenizer, texts: Sequence[str], *, max_tokens: int | None = None, offsets: bool = False
                    ) -> tuple[list[int], int, list[tuple[int, str, list[tuple[int, int]]]]]:
    """``(ids, words, documents)``: :func:`token_stream`, and with ``offsets`` each document that made it in.

    A document is ``(stream position of its first body token, its text, its body tokens' character
    spans)`` (from the fast tokenizer's offset mapping of the same encoding; the spans of a document
    cut by ``max_tokens`` stop where the stream does). Without ``offsets`` the list is empty.
    """
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs bos and eos tokens to delimit documents")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens!r}")
    ids: list[int] = []
    words = 0
    documents: list[tuple[int, str, list[tuple[int, int]]]] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # Encode documents in batches (fast); under max_tokens start with one and double, so that a
    # short stream does not pay for encoding 32 whole modules.
    chunk = 1 if max_tokens is not None else 32
    c = 0
    while c < len(texts):
        batch = list(texts[c : c + chunk])
        c, chunk = c + len(batch), min(2 * chunk, 32)
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False, return_offsets_mapping=offsets)
        spans = encoded["offset_mapping"] if offsets else [None] * len(batch)
        for text, body, span in zip(batch, encoded["input_ids"], spans):
            doc = [bos, *body, eos]
            if offsets:
                documents.append((len(ids) + 1, text, [tuple(x) for x in span]))
            if max_tokens is not None and len(ids) + len(doc) > max_tokens:
                part = doc[: max_tokens - len(ids)]
                ids.extend(part)
                words += len(tokenizer.decode([t for t in part if t not in (bos, eos)]).split())
                if offsets:
                    documents[-1] = (*documents[-1][:2], documents[-1][2][: max(0, len(part) - 1)])
                return ids, words, documents
            ids.extend(doc)
            words += len(text.split())
    if len(ids) < 2:
        raise ValueError("nothing to score: the texts produce fewer than 2 tokens")
    return ids, words, documents


def longrange_targets(tokenizer, texts: Sequence[str], *, seq_len: int, min_distance: int,
                      max_tokens: int | None = None) -> tuple[list[int], int, torch.Tensor]:
    """``(ids, words, mask)``: the scoring stream and its long-range targets (``harness.evaluation.longrange``)."""
    from harness.evaluation.longrange import identifier_occurrences, longrange_mask, occurrence_tokens

    ids, words, documents = document_stream(tokenizer, texts, max_tokens=max_tokens, offsets=True)
    occurrences = [(base, occurrence_tokens(spans, identifier_occurrences(text))) for base, text, spans in documents]
    return ids, words, longrange_mask(occurrences, len(ids), seq_len=seq_len, min_distance=min_distance)


@torch.inference_mode()
def score_windows(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int,
    window_logits: Callable[[torch.Tensor], torch.Tensor],
    protocol: str,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    max_tokens: int | None = None,
    progress: bool = False,
    min_distance: int | None = None,
    pad_short_window: bool = False,
) -> dict:
    """Score the stream of ``texts`` in windows with ``window_logits(inputs [B, n]) -> logits [B, n, V]``.

    The one implementation of the protocol above; :func:`perplexity` (full forward) and
    :func:`harness.evaluation.evaluate.bounded_cache_perplexity` (token by token through a cache) differ
    only in how a window's logits are computed. With ``min_distance`` the same pass also sums the
    NLL of the long-range targets (``harness.evaluation.longrange``) into ``result["longrange"]``.

    ``pad_short_window``: the short last window joins the last batch (if it has room), right-padded;
    only for a causal ``window_logits`` whose rows are independent (token-by-token decoding), where
    tokens after a position cannot change its logits, so the scores are those of the window alone
    and a whole sequential pass is saved.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if min_distance is not None:
        ids, words, far = longrange_targets(tokenizer, texts, seq_len=seq_len, min_distance=min_distance,
                                            max_tokens=max_tokens)
    else:
        ids, words = token_stream(tokenizer, texts, max_tokens=max_tokens)
        far = torch.zeros(len(ids), dtype=torch.bool)
    stream = torch.tensor(ids, dtype=torch.long)
    full, rest = divmod(len(ids) - 1, seq_len)
    # Equal-length windows go in batches; the short last window runs alone (no padding, so
    # methods that route or evict per sequence see exactly the scored tokens), unless the caller's
    # logits are causal per row (pad_short_window).
    batches = [([(s, seq_len) for s in range(b * seq_len, min(b + batch_size, full) * seq_len, seq_len)])
               for b in range(0, full, batch_size)]
    if rest and pad_short_window and batches and len(batches[-1]) < batch_size:
        batches[-1].append((full * seq_len, rest))
    elif rest:
        batches.append([(full * seq_len, rest)])
    # padding: inputs <pad> (or <eos>), targets <bos> (never scored), so a padded position counts nowhere
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    nll_sum, scored = 0.0, 0
    window_nll: list[float] = []
    window_tokens: list[int] = []
    far_nll: list[float] = []
    far_tokens: list[int] = []
    try:
        for rows_of in tqdm(batches, desc="perplexity", disable=not progress, dynamic_ncols=True):
            n = max(m for _, m in rows_of)
            starts = [s for s, _ in rows_of]
            inputs = torch.stack([F.pad(stream[s : s + m], (0, n - m), value=pad) for s, m in rows_of]).to(device)
            targets = torch.stack([F.pad(stream[s + 1 : s + m + 1], (0, n - m), value=tokenizer.bos_token_id)
                                   for s, m in rows_of]).to(device)
            logits = window_logits(inputs).float()
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
            mask = targets.reshape(-1) != tokenizer.bos_token_id
            nll_sum += float(nll[mask].sum(dtype=torch.float64))
            scored += int(mask.sum())
            # per window (row) as well; the total above stays summed as before, so ppl_token is unchanged
            rows = torch.where(mask, nll, torch.zeros_like(nll)).view(len(starts), n)
            window_nll += [float(v) for v in rows.sum(dim=1, dtype=torch.float64)]
            window_tokens += [int(v) for v in mask.view(len(starts), n).sum(dim=1)]
            # long-range targets (never <bos>): the same NLL values, summed over their mask
            hit = torch.stack([F.pad(far[s + 1 : s + m + 1], (0, n - m), value=False)
                               for s, m in rows_of]).to(nll.device).reshape(-1)
            far_rows = torch.where(hit, nll, torch.zeros_like(nll)).view(len(starts), n)
            far_nll += [float(v) for v in far_rows.sum(dim=1, dtype=torch.float64)]
            far_tokens += [int(v) for v in hit.view(len(starts), n).sum(dim=1)]
    finally:
        model.train(was_training)
    result = {
        "ppl_token": math.exp(nll_sum / scored),
        "ppl_word": math.exp(nll_sum / words) if words else float("nan"),
        "tokens": scored,
        "words": words,
        "nll_sum": nll_sum,
        "window_nll": window_nll,
        "window_tokens": window_tokens,
        "seq_len": seq_len,
        "protocol": protocol,
    }
    if min_distance is not None:
        from harness.evaluation.longrange import DEFINITION

        far_sum, far_n = math.fsum(far_nll), sum(far_tokens)
        result["longrange"] = {
            "min_distance": min_distance, "tokens": far_n, "nll_sum": far_sum,
            "ppl": math.exp(far_sum / far_n) if far_n else float("nan"),
            "window_nll": far_nll, "window_tokens": far_tokens, "definition": DEFINITION,
        }
    return result


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    max_tokens: int | None = None,
    min_distance: int | None = None,
) -> dict:
    """Perplexity of ``model`` on ``texts``: ``{"ppl_token", "ppl_word", "tokens", "words", "nll_sum", ...}``.

    ``tokens`` is the number of scored targets; ``nll_sum`` is in nats; ``window_nll`` / ``window_tokens``
    the same per window; with ``min_distance``, ``longrange`` holds the long-range task's fields.
    """
    return score_windows(
        model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, device=device,
        max_tokens=max_tokens, min_distance=min_distance, window_logits=lambda inputs: model(input_ids=inputs, use_cache=False).logits,
        protocol="non-overlapping windows over <bos> doc <eos> stream; <bos> targets not scored",
    )


def unigram_counts(tokenizer, texts: Sequence[str]) -> Counter:
    """Token counts of ``texts`` in the scoring stream format (``<bos>`` excluded, ``<eos>`` included)."""
    ids, _ = token_stream(tokenizer, texts)
    counts = Counter(ids)
    counts.pop(tokenizer.bos_token_id, None)
    return counts


def unigram_perplexity(
    tokenizer,
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    *,
    max_tokens: int | None = None,
    train_counts: Counter | None = None,
) -> float:
    """Per-token perplexity of an add-one-smoothed unigram model fitted on ``train_texts``.

    Scores the same targets as :func:`perplexity` (every token after the first, ``<bos>``
    excluded) over the whole vocabulary (``len(tokenizer)``). ``train_counts`` skips re-counting.
    """
    counts = train_counts if train_counts is not None else unigram_counts(tokenizer, train_texts)
    vocab = len(tokenizer)
    total = sum(counts.values()) + vocab
    ids, _ = token_stream(tokenizer, eval_texts, max_tokens=max_tokens)
    targets = [t for t in ids[1:] if t != tokenizer.bos_token_id]
    if not targets:
        raise ValueError("no tokens to score in eval_texts")
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in targets)
    return math.exp(nll / len(targets))
