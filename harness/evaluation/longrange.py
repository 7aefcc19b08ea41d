"""The long-range task: which scored tokens can only be predicted well from context far back.

A target token is *long-range* when it belongs to an identifier whose previous occurrence in
the same document (stdlib module) starts at least ``min_distance`` tokens before this
occurrence starts, and that previous occurrence still lies inside the window the target is
scored in (so a model that keeps every token of its context can see it; one that evicted it
cannot). Its perplexity, ``ppl_longrange``, is read off the same scoring pass as the overall
perplexity (``harness.evaluation.perplexity.score_windows``): no second forward.

Definitions (deterministic, from the document text and the token stream alone):

* **identifier**: a ``NAME`` token of Python's own tokenizer (:mod:`tokenize`) that is not a
  hard keyword (``def``, ``return``, ... are not identifiers; soft keywords such as ``match`` or
  ``_`` are). Names inside strings, docstrings and comments are not ``NAME`` tokens and do not
  count. A module that stops tokenizing (e.g. cut by ``max_tokens``) keeps the names read up to
  where it stopped.
* **sub-word tokens**: an occurrence is made of every model token whose character span overlaps
  the identifier's characters (a leading space or ``.``/``(`` merged into the token does not
  stop it from counting). *All* of them are scored as long-range, not only the first: each is
  a prediction the earlier occurrence informs, and the first alone would leave too few tokens.
* **distance**: stream position of this occurrence's first token minus that of the most recent
  earlier occurrence of the same name in the same document. The most recent one decides: if it
  is nearer than ``min_distance`` the token is not long-range, however far an older one lies.
* **inside the window**: the target at stream position ``p`` is predicted in window
  ``(p - 1) // seq_len``, whose context starts at position ``((p - 1) // seq_len) * seq_len``;
  the previous occurrence's first token must be at or after that start.
"""

from __future__ import annotations

import bisect
import io
import keyword
import tokenize
from collections.abc import Sequence

import torch

#: One line for records and tables: what ``ppl_longrange`` measures.
DEFINITION = ("tokens of Python identifiers (tokenize NAME, not keywords; every overlapping sub-word token) whose "
              "previous occurrence in the same module starts >= min_distance tokens earlier, inside the scored window")


def identifier_occurrences(text: str) -> list[tuple[str, int, int]]:
    """``(name, start, end)`` character spans of the identifiers of ``text`` (Python source), in order."""
    starts = [0]
    for line in io.StringIO(text).readlines():  # the same line splitting as tokenize's readline
        starts.append(starts[-1] + len(line))
    found: list[tuple[str, int, int]] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
                (row, col), (erow, ecol) = tok.start, tok.end
                found.append((tok.string, starts[row - 1] + col, starts[erow - 1] + ecol))
    except (tokenize.TokenError, SyntaxError):
        pass  # a module cut short (or not Python): the names read so far stand
    return found


def occurrence_tokens(offsets: Sequence[tuple[int, int]], occurrences: Sequence[tuple[str, int, int]]
                      ) -> list[tuple[str, list[int]]]:
    """``(name, token indices)`` of each occurrence: the tokens whose ``[start, end)`` overlaps its characters.

    ``offsets`` are the tokens' character spans in the document (ascending, as a fast tokenizer's
    offset mapping gives them). Occurrences no token covers (cut off the stream) are dropped.
    """
    ends = [e for _, e in offsets]
    out: list[tuple[str, list[int]]] = []
    for name, start, end in occurrences:
        first = bisect.bisect_right(ends, start)  # first token that ends after the identifier starts
        tokens = []
        for t in range(first, len(offsets)):
            s, e = offsets[t]
            if s >= end:
                break
            if e > s and e > start:
                tokens.append(t)
        if tokens:
            out.append((name, tokens))
    return out


def longrange_mask(documents: Sequence[tuple[int, Sequence[tuple[str, list[int]]]]], n_positions: int, *,
                   seq_len: int, min_distance: int) -> torch.Tensor:
    """Boolean mask over stream positions ``[0, n_positions)``: True where the target is long-range.

    ``documents``: per document, the stream position of its first body token and its
    occurrences as ``(name, token indices within the body)`` (:func:`occurrence_tokens`).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
    if min_distance < 1:
        raise ValueError(f"min_distance must be >= 1, got {min_distance!r}")
    mask = torch.zeros(n_positions, dtype=torch.bool)
    for base, occurrences in documents:
        last: dict[str, int] = {}  # name -> stream position of its latest occurrence's first token
        for name, tokens in occurrences:
            first = base + tokens[0]
            prev = last.get(name)
            last[name] = first
            if prev is None or first - prev < min_distance:
                continue
            for t in tokens:
                p = base + t
                if 1 <= p < n_positions and prev >= ((p - 1) // seq_len) * seq_len:
                    mask[p] = True
    return mask
