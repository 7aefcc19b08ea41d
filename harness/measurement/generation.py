"""Generate exactly N tokens with a method's cache: the one helper runs, overheads and benchmarks share."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class StepClock(LogitsProcessor):
    """Timestamps every generation step from inside ``generate`` (a pass-through logits processor).

    ``generate`` calls its logits processors once per new token, right after the forward that
    produced that token's logits: the first call ends the prefill, the last one the final decode
    step. So :attr:`decode_seconds` times exactly the ``n - 1`` forwards that read the cache, in the
    same call, instead of subtracting a separately timed prefill from a whole generation (a
    difference of two noisy timings, which goes negative when the prefill is most of the time).
    On a GPU each stamp synchronizes first.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.stamps: list[float] = []
        self.start: float | None = None

    def begin(self) -> "StepClock":
        """Stamp the start of the call (:attr:`first_token_seconds` counts from here)."""
        self.stamps, self.start = [], self._now()
        return self

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(self._now())
        return scores

    @property
    def first_token_seconds(self) -> float:
        """From :meth:`begin` to the first token's logits: the prefill, with ``generate``'s set-up."""
        if self.start is None or not self.stamps:
            raise RuntimeError("the clock did not run: call begin(), then generate with it")
        return self.stamps[0] - self.start

    @property
    def decode_seconds(self) -> float:
        """From the first token's logits to the last one's: ``len(stamps) - 1`` decode steps."""
        if len(self.stamps) < 2:
            raise RuntimeError(f"decode time needs at least 2 generated tokens, the clock saw {len(self.stamps)}")
        return self.stamps[-1] - self.stamps[0]

    def processors(self) -> LogitsProcessorList:
        """This clock as ``generate``'s ``logits_processor`` argument."""
        return LogitsProcessorList([self])


class Baton:
    """Turn-taking between generations run in threads: exactly one holds the baton at a time.

    ``wait(i)`` blocks until it is participant ``i``'s turn (or every other one has finished);
    ``pass_on(i)`` hands the turn to the next unfinished participant; ``finish(i)`` leaves.
    With the threads blocked while not holding it, the generations run one step at a time in
    alternation, never concurrently.
    """

    def __init__(self, participants: int):
        if participants < 1:
            raise ValueError(f"a baton needs at least one participant, got {participants!r}")
        self._cond = threading.Condition()
        self._turn = 0
        self._done = [False] * participants

    def _next(self, who: int) -> int:
        n = len(self._done)
        for step in range(1, n + 1):
            if not self._done[(who + step) % n]:
                return (who + step) % n
        return who

    def wait(self, who: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == who or all(d for i, d in enumerate(self._done) if i != who))

    def pass_on(self, who: int) -> None:
        with self._cond:
            self._turn = self._next(who)
            self._cond.notify_all()

    def finish(self, who: int) -> None:
        with self._cond:
            self._done[who] = True
            self._turn = self._next(who)
            self._cond.notify_all()


class LockstepClock(StepClock):
    """A :class:`StepClock` whose generation hands a :class:`Baton` on after every step.

    Its clock runs only while its generation holds the baton, so :attr:`first_token_seconds` and
    :attr:`decode_seconds` are the same quantities as a lone :class:`StepClock`'s, with the time
    spent waiting for the other generations left out.
    """

    def __init__(self, baton: Baton, who: int, device: torch.device | str = "cpu"):
        super().__init__(device)
        self.baton, self.who = baton, who
        self._active = 0.0
        self._resumed = 0.0

    def begin(self) -> "LockstepClock":
        self._active, self._resumed = 0.0, super()._now()
        self.stamps, self.start = [], 0.0
        return self

    def _now(self) -> float:  # active time: the real clock, paused while another generation runs
        return self._active + (super()._now() - self._resumed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._active = self._now()
        self.stamps.append(self._active)
        self.baton.pass_on(self.who)
        self.baton.wait(self.who)
        self._resumed = super()._now()
        return scores


def lockstep(runs: Sequence[Callable[[StepClock], Any]], device: torch.device | str = "cpu") -> list[Any]:
    """Run ``runs`` (each ``run(clock)`` starts its clock, generates with it, returns its sample) in lockstep.

    One thread per run; run 0 prefills first, then the generations alternate token by token, so
    each decode step of one is timed next to a step of the others (a few milliseconds apart) and
    drift of the machine between those falls on all alike. Returns the runs' results in order;
    re-raises the first exception.
    """
    baton = Baton(len(runs))
    results: list[Any] = [None] * len(runs)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            baton.wait(i)
            results[i] = runs[i](LockstepClock(baton, i, device))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
        finally:
            baton.finish(i)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


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
