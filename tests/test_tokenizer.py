"""Byte-level BPE tokenizer: deterministic training, special tokens, lossless round trip."""

import json
import shutil

import pytest

from harness.data.corpus import build_corpus, stdlib_dir
from harness.data.tokenizer import BOS, EOS, PAD, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "src").mkdir()
    for name in ("colorsys", "bisect", "heapq", "fnmatch", "shlex", "textwrap", "string", "copy"):
        shutil.copy(stdlib_dir() / f"{name}.py", root / "src" / f"{name}.py")
    build_corpus(root / "corpus", source_dir=root / "src", val_fraction=0.25, test_fraction=0.2)
    return root


def test_train_save_load_and_special_tokens(corpus):
    tok = train_tokenizer(corpus / "corpus", corpus / "tok", vocab_size=400)
    assert len(tok) == 400
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (corpus / "tok" / "tokenizer.json").is_file()
    again = load_tokenizer(corpus / "tok")
    text = "def f(x):\n    return x  # naïve ✓ \t\n"
    ids = again(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert again.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless, no <unk>
    assert again(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert len(ids) < len(text.encode())  # merges were learned


def test_training_is_deterministic(corpus):
    train_tokenizer(corpus / "corpus", corpus / "a", vocab_size=350)
    train_tokenizer(corpus / "corpus", corpus / "b", vocab_size=350)
    a = json.loads((corpus / "a" / "tokenizer.json").read_text())["model"]
    b = json.loads((corpus / "b" / "tokenizer.json").read_text())["model"]
    assert a["vocab"] == b["vocab"] and a["merges"] == b["merges"]


def test_bad_input(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus / "corpus", tmp_path / "t", vocab_size=100)
    with pytest.raises(FileNotFoundError):
        train_tokenizer(tmp_path / "no-corpus", tmp_path / "t")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "empty")
