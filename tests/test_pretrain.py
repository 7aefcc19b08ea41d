"""Pretraining loop: learns, saves atomically, resumes to the identical result, rejects bad input."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from harness.data.corpus import build_corpus, read_split, stdlib_dir
from harness.evaluation.perplexity import perplexity
from harness.training.pretrain import OFFLINE_RECIPES, pretrain, pretrain_recipe, read_pretrain_result
from harness.data.tokenizer import train_tokenizer
from harness.models.zoo import FAMILIES, load_base_model
from harness.training.train import CHECKPOINT_FILE, TokenStream, lr_multiplier, window_starts

SMALL = {"num_hidden_layers": 2}
FAST = {"batch_size": 2, "seq_len": 32, "eval_tokens": 256, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    (root / "src").mkdir()
    for name in ("colorsys", "bisect", "heapq", "shlex", "string", "copy", "stat", "abc"):
        shutil.copy(stdlib_dir() / f"{name}.py", root / "src" / f"{name}.py")
    build_corpus(root / "corpus", source_dir=root / "src", val_fraction=0.25, test_fraction=0.2)
    train_tokenizer(root / "corpus", root / "tok", vocab_size=300)
    return root


def test_stream_batches_and_the_pretraining_recipe_are_deterministic():
    stream = TokenStream(torch.arange(1000), seq_len=16)
    recipe = pretrain_recipe("llama3", "tiny", steps=10, batch_size=3, seq_len=16, lr=1e-3)
    plan = stream.plan(recipe, seed=0)
    assert len(plan) == 10 and plan == stream.plan(recipe, seed=0) and plan != stream.plan(recipe, seed=1)
    # a step's windows depend on (seed, step) alone; values as the offline base models were trained on
    assert plan[5] == window_starts(1000, 5, seed=0, batch_size=3, seq_len=16) == [425, 429, 281]
    assert window_starts(1000, 0, seed=7, batch_size=2, seq_len=16) == [413, 122]
    assert plan[5] != plan[6]
    batch = stream.collate(plan[5])
    assert batch["input_ids"].shape == batch["targets"].shape == (3, 16)
    assert batch["input_ids"][:, 0].tolist() == plan[5]
    assert torch.equal(batch["input_ids"][:, 1:] - batch["input_ids"][:, :-1], torch.ones(3, 15, dtype=torch.long))
    assert torch.equal(batch["targets"], batch["input_ids"] + 1)  # the next tokens, already shifted
    assert TokenStream(torch.arange(1000), seq_len=16).fingerprint == stream.fingerprint
    assert TokenStream(torch.arange(1, 1001), seq_len=16).fingerprint != stream.fingerprint
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenStream(torch.arange(17), seq_len=16)

    # one forward per step; warm-up max(1, round(ratio * steps)), not the CPT/SFT ceil
    assert (recipe.kind, recipe.micro_batch_size, recipe.max_steps, recipe.grad_clip) == ("pretrain", 3, 10, 1.0)
    assert pretrain_recipe("opt", "tiny", steps=25, batch_size=2, seq_len=8, lr=1e-3,
                           warmup_ratio=0.1).warmup_steps(25) == 2  # 2.5 rounds to 2 (ceil: 3)
    assert recipe.warmup_steps(10) == 1  # 0.05 * 10 rounds to 0, at least 1
    assert pretrain_recipe("opt", "tiny", steps=5, batch_size=2, seq_len=8, lr=1e-3, grad_clip=0.0).grad_clip is None
    assert set(OFFLINE_RECIPES) == set(FAMILIES)


def test_pretrain_learns_and_saves_a_loadable_model(data, tmp_path):
    out = tmp_path / "llama3"
    result = pretrain("llama3", "tiny", data / "tok", data / "corpus", out, steps=40, lr=3e-3, seed=0,
                      threads=1, model_overrides=SMALL, log_every=5, **FAST)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "pretrain.json"}
    assert not (tmp_path / "llama3.partial").exists() and not list(tmp_path.glob(".llama3.*"))
    assert read_pretrain_result(out) == json.loads((out / "pretrain.json").read_text()) == result
    for key in ("family", "size", "params", "steps", "tokens_seen", "wall_seconds_train", "final_train_loss",
                "val_ppl_token", "val_ppl_word", "unigram_ppl_token", "seed", "corpus_fingerprint"):
        assert key in result
    assert result["tokens_seen"] == 40 * 2 * 32 and result["model_overrides"] == SMALL
    history = result["history"]
    # logged every log_every steps: the mean loss of those steps and the lr of the next step
    assert [h["step"] for h in history] == list(range(5, 41, 5))
    assert history[-1]["lr"] == pytest.approx(3e-3 * 0.1) and result["warmup_steps"] == 2
    assert history[0]["lr"] == 3e-3 * lr_multiplier(5, total=40, warmup=2, min_ratio=0.1)  # step 6's lr
    # starts near log(vocab) (uniform guess), ends well below it
    assert history[-1]["loss"] < history[0]["loss"] < math.log(300) + 0.5
    assert history[-1]["loss"] < math.log(300) - 0.8
    model, tok = load_base_model(out)
    again = perplexity(model, tok, read_split(data / "corpus", "validation"), seq_len=32, max_tokens=256)
    assert again["ppl_token"] == pytest.approx(result["val_ppl_token"], rel=1e-5)
    assert result["val_ppl_token"] < 300 / 2 and result["unigram_ppl_token"] < 300  # both beat a uniform guess


def test_killed_job_resumes_to_the_identical_model(data, tmp_path):
    kwargs = dict(steps=6, lr=2e-3, seed=3, threads=1, model_overrides=SMALL, checkpoint_every=2, **FAST)
    straight = pretrain("opt", "tiny", data / "tok", data / "corpus", tmp_path / "a", **kwargs)
    # a stale checkpoint from other settings must be ignored, not resumed
    stale = pretrain("opt", "tiny", data / "tok", data / "corpus", tmp_path / "b", stop_after=3,
                     **{**kwargs, "lr": 9e-3})
    assert stale["status"] == "partial" and stale["step"] == 3 and not (tmp_path / "b").exists()
    assert (tmp_path / "b.partial" / CHECKPOINT_FILE).is_file()  # the one trainer's checkpoint
    fresh = pretrain("opt", "tiny", data / "tok", data / "corpus", tmp_path / "b", **kwargs)
    assert fresh["history"] == straight["history"] and fresh["val_ppl_token"] == straight["val_ppl_token"]
    pretrain("opt", "tiny", data / "tok", data / "corpus", tmp_path / "c", stop_after=3, **kwargs)
    resumed = pretrain("opt", "tiny", data / "tok", data / "corpus", tmp_path / "c", **kwargs)
    a, c = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    for key in ("val_ppl_token", "final_train_loss", "history", "tokens_seen"):
        assert resumed[key] == straight[key]
    assert not (tmp_path / "c.partial").exists()


@pytest.mark.parametrize("family", ["tinyllama", "gemma2"])
def test_every_family_pretrains(data, tmp_path, family):
    result = pretrain(family, "tiny", data / "tok", data / "corpus", tmp_path / family, steps=2, lr=1e-3,
                      model_overrides=SMALL, **FAST)
    assert result["model_type"] == FAMILIES[family].model_type and math.isfinite(result["val_ppl_token"])


def test_bad_input(data, tmp_path):
    common = dict(tokenizer_dir=data / "tok", corpus_dir=data / "corpus", out_dir=tmp_path / "x", lr=1e-3)
    with pytest.raises(ValueError, match="steps"):
        pretrain("llama3", "tiny", steps=0, batch_size=2, seq_len=32, **common)
    with pytest.raises(ValueError, match="known families"):
        pretrain("gpt2", "tiny", steps=1, batch_size=2, seq_len=32, **common)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pretrain("opt", "tiny", steps=1, batch_size=2, seq_len=32, model_overrides={"max_position_embeddings": 16},
                 **common)
    with pytest.raises(ValueError, match="lr"):
        pretrain("llama3", "tiny", steps=1, batch_size=2, seq_len=32, **{**common, "lr": 0.0})
    assert not (tmp_path / "x").exists()
