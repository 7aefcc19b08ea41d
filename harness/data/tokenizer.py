"""Byte-level BPE tokenizer trained on the corpus' training split.

Byte-level means every string round-trips (no unknown token), which matters for code.
Encoding a text prepends ``<|bos|>`` (as Llama / Gemma tokenizers do); ``<|eos|>`` ends a
document in the pretraining stream and a response in fine-tuning. Training is
deterministic: the same corpus and vocabulary size give the same merges.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from harness.data.corpus import read_split
from harness.atomic import atomic_directory

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train on the ``train`` split of ``corpus_dir`` and ``save_pretrained`` to ``out_dir``."""
    return train_tokenizer_on(read_split(corpus_dir, "train"), out_dir, vocab_size, min_frequency=min_frequency,
                              model_max_length=model_max_length)


def train_tokenizer_on(
    texts: list[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``texts`` and ``save_pretrained`` it to ``out_dir``."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (256 bytes + special tokens), got {vocab_size!r}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    with atomic_directory(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer` (or any ``save_pretrained`` directory / hub name)."""
    p = Path(path)
    if p.exists() and not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer files in {str(p)!r} (expected tokenizer.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        # Hub causal-LM tokenizers (Llama 3, OPT is fine) often lack a pad token; batching needs one.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
