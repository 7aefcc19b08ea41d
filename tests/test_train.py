"""The trainer and the recipes: resume, same tokens, SFT masking, accumulation, schedule, aux/routing logs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.testing import tiny_model
from harness.training.recipes import (
    CPT_OFFLINE,
    CPT_PAPER,
    PRETRAIN,
    RECIPES,
    SFT_OFFLINE,
    SFT_PAPER_OPT,
    Recipe,
    get_recipe,
)
from harness.training.train import (
    CHECKPOINT_FILE,
    IGNORE_INDEX,
    Curve,
    curve_steps,
    held_out_loss,
    RESULT_FILE,
    cpt_data,
    lr_multiplier,
    make_optimizer,
    plan_batches,
    sft_data,
    stream_data,
    train,
)
from mixsga import MixSGAConfig, convert_to_mixsga

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # value number {i}\n" for i in range(40)]
ROWS = [{"prompt": f"Summarise f{i}:\n", "references": [f"returns x times {i}" + " plus one" * (i % 4), "other"]}
        for i in range(12)]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TEXTS)


def _cpt_recipe(**kw) -> Recipe:
    base = dict(batch_size=4, micro_batch_size=2, seq_len=32, max_steps=6, checkpoint_every=100)
    return CPT_OFFLINE.replace(**{**base, **kw})


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_interrupted_training_resumes_to_the_same_loss(tok, tmp_path):
    # OPT with dropout: the resumed run only matches if the RNG state is restored too.
    data = cpt_data(tok, TEXTS, 32)
    recipe = _cpt_recipe()
    straight_model = tiny_model("opt", vocab_size=len(tok), dropout=0.1)
    straight = train(straight_model, data, recipe, tmp_path / "a", seed=3, progress=False)

    crashed = train(tiny_model("opt", vocab_size=len(tok), dropout=0.1), data, recipe, tmp_path / "b",
                    seed=3, progress=False, stop_after=2)
    assert not crashed["completed"] and crashed["steps"] == 2
    assert (tmp_path / "b" / CHECKPOINT_FILE).is_file() and not (tmp_path / "b" / RESULT_FILE).exists()
    # A differently initialised model proves the weights come from the checkpoint.
    resumed_model = tiny_model("opt", seed=7, vocab_size=len(tok), dropout=0.1)
    # How often to checkpoint may change between the runs; what is trained may not.
    resumed = train(resumed_model, data, recipe.replace(checkpoint_every=3), tmp_path / "b", seed=3,
                    progress=False)

    assert resumed["completed"] and resumed["resumed_from"] == 2
    assert resumed["final_loss"] == straight["final_loss"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    a, b = _params(straight_model), _params(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / RESULT_FILE).read_text())["final_loss"] == straight["final_loss"]

    # A finished run reruns as a no-op that loads the trained weights.
    again_model = tiny_model("opt", seed=11, vocab_size=len(tok), dropout=0.1)
    again = train(again_model, data, recipe, tmp_path / "b", seed=3, progress=False)
    assert again["final_loss"] == straight["final_loss"] and again["steps"] == recipe.max_steps
    assert all(torch.equal(a[k], v) for k, v in _params(again_model).items())


def test_checkpoint_of_another_run_is_refused(tok, tmp_path):
    data = cpt_data(tok, TEXTS, 32)
    train(tiny_model("llama", vocab_size=len(tok)), data, _cpt_recipe(), tmp_path, seed=0, progress=False,
          stop_after=1)
    with pytest.raises(ValueError, match="different run"):
        train(tiny_model("llama", vocab_size=len(tok)), data, _cpt_recipe(), tmp_path, seed=1, progress=False)
    fresh = train(tiny_model("llama", vocab_size=len(tok)), data, _cpt_recipe(max_steps=1), tmp_path, seed=1,
                  progress=False, resume=False)
    assert fresh["resumed_from"] is None and fresh["completed"]


def test_every_method_sees_the_same_tokens(tok, tmp_path):
    data = cpt_data(tok, TEXTS, 32)
    recipe = _cpt_recipe(max_steps=2)
    runs = {fam: train(tiny_model(fam, vocab_size=len(tok)), data, recipe, tmp_path / fam, seed=0, progress=False)
            for fam in ("llama", "opt")}
    assert runs["llama"]["token_hash"] == runs["opt"]["token_hash"]
    assert runs["llama"]["tokens_seen"] == runs["opt"]["tokens_seen"] == 2 * 4 * 32
    other_seed = train(tiny_model("llama", vocab_size=len(tok)), data, recipe, tmp_path / "s1", seed=1,
                       progress=False)
    assert other_seed["token_hash"] != runs["llama"]["token_hash"]
    other_data = cpt_data(tok, ["# changed\n" + TEXTS[0], *TEXTS[1:]], 32)
    assert train(tiny_model("llama", vocab_size=len(tok)), other_data, recipe, tmp_path / "d", seed=0,
                 progress=False)["token_hash"] != runs["llama"]["token_hash"]


def test_plan_covers_each_example_once_per_epoch():
    recipe = SFT_OFFLINE.replace(batch_size=3, micro_batch_size=1, epochs=2.0)
    plan = plan_batches(10, recipe, seed=5)
    assert len(plan) == 6  # floor(2 * 10 / 3)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    assert plan == plan_batches(10, recipe, seed=5) and plan != plan_batches(10, recipe, seed=6)
    with pytest.raises(ValueError, match="0 optimiser steps"):
        plan_batches(1, recipe, seed=0)


def test_sft_masks_prompt_and_step_loss_is_the_token_mean(tok, tmp_path):
    data = sft_data(tok, ROWS, 64)
    assert data.meta["examples"] == len(ROWS)
    first = data.labels[0]
    n_prompt = len(tok(ROWS[0]["prompt"])["input_ids"])
    assert (first[:n_prompt] == IGNORE_INDEX).all() and (first[n_prompt:] != IGNORE_INDEX).all()
    assert int(first[-1]) == tok.eos_token_id
    assert tok.decode(data.input_ids[0][n_prompt:-1]) == ROWS[0]["references"][0]

    recipe = SFT_OFFLINE.replace(batch_size=4, micro_batch_size=1, seq_len=64, max_steps=1)
    model = tiny_model("llama", vocab_size=len(tok))
    # Independent loss of the first batch: mean cross-entropy over all its response tokens.
    batch = plan_batches(len(data), recipe, seed=0)[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in batch:
            logits = model(input_ids=data.input_ids[i][None]).logits[0, :-1]
            target = data.labels[i][1:]
            keep = target != IGNORE_INDEX
            nll += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    result = train(model, data, recipe, tmp_path, seed=0, progress=False)
    assert result["target_tokens"] == count
    assert math.isclose(result["final_loss"], nll / count, rel_tol=1e-5)


def test_sft_truncates_and_skips(tok):
    long_prompt = {"prompt": "word " * 80, "references": ["x"]}
    data = sft_data(tok, [*ROWS[:2], long_prompt], 24)
    assert data.meta["skipped"] == 1 and len(data) == 2
    assert all(len(x) <= 24 for x in data.input_ids)
    with pytest.raises(ValueError, match="references"):
        sft_data(tok, [{"prompt": "p", "references": "not a list"}], 24)
    with pytest.raises(ValueError, match="'prompt'"):
        sft_data(tok, [{"instruction": "p"}], 24)
    with pytest.raises(ValueError, match="no usable"):
        sft_data(tok, [long_prompt], 24)


def test_gradient_accumulation_matches_one_big_batch(tok, tmp_path):
    data = sft_data(tok, ROWS, 64)
    losses = {}
    for micro in (4, 1):
        recipe = SFT_OFFLINE.replace(batch_size=4, micro_batch_size=micro, seq_len=64, max_steps=3)
        res = train(tiny_model("llama", vocab_size=len(tok)), data, recipe, tmp_path / str(micro), seed=0,
                    progress=False)
        losses[micro] = [h["loss"] for h in res["history"]]
        assert res["accumulation"] == 4 // micro
    assert losses[4] == pytest.approx(losses[1], rel=1e-5)


def test_schedule_warms_up_then_decays():
    lrs = [lr_multiplier(s, total=100, warmup=10, min_ratio=0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02)
    assert lr_multiplier(100, total=100, warmup=10, min_ratio=0.1) == pytest.approx(0.1)


def test_one_schedule_gives_both_former_schedules_exactly():
    # Exact floats of the two schedules the trainers had before they became one loop (pretraining's
    # lr_lambda and CPT/SFT's lr_multiplier), so the base models and checkpoints stay bit-identical.
    pretraining = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 37: 0.8145033635316129, 55: 0.55, 99: 0.10027412784140691,
                   100: 0.1, 150: 0.1}
    finetuning = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 37: 0.7938926261462366, 55: 0.5, 99: 0.00030458649045211894,
                  100: 0.0, 150: 0.0}
    for step, value in pretraining.items():
        assert lr_multiplier(step, total=100, warmup=10, min_ratio=0.1) == value, step
    for step, value in finetuning.items():
        assert lr_multiplier(step, total=100, warmup=10, min_ratio=0.0) == value, step
    assert [lr_multiplier(s, total=25, warmup=2, min_ratio=0.1) for s in (0, 1, 2, 13, 25)] == [
        0.5, 1.0, 1.0, 0.580709086014102, 0.1]
    # and the two warm-up rules: CPT/SFT ceil (as transformers' Trainer), pretraining max(1, round)
    assert CPT_OFFLINE.replace(warmup_ratio=0.1).warmup_steps(25) == 3
    assert PRETRAIN.replace(warmup_ratio=0.1).warmup_steps(25) == 2
    assert PRETRAIN.warmup_steps(6) == 1 and CPT_OFFLINE.warmup_steps(6) == 1
    assert PRETRAIN.warmup_steps(720) == 36 and CPT_OFFLINE.warmup_steps(64) == 1


def test_optimizer_decays_matrices_only(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    opt = make_optimizer(model, CPT_OFFLINE)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == CPT_OFFLINE.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"]) == (1e-3, (0.9, 0.95), 1e-8)


def test_a_token_stream_trains_on_next_token_targets(tok, tmp_path):
    # The pretraining source through the same loop: its loss is the mean next-token cross-entropy
    # over the windows' targets, computed independently here.
    stream = stream_data(tok, TEXTS, 16)
    recipe = PRETRAIN.replace(batch_size=2, micro_batch_size=2, seq_len=16, max_steps=1, grad_clip=None)
    model = tiny_model("llama", vocab_size=len(tok))
    batch = stream.collate(stream.plan(recipe, seed=4)[0])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        expected = float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1)))
    result = train(model, stream, recipe, tmp_path, seed=4, progress=False)
    assert result["kind"] == "pretrain" and result["completed"]
    assert result["target_tokens"] == result["tokens_seen"] == 2 * 16
    assert math.isclose(result["final_loss"], expected, rel_tol=1e-6)
    with pytest.raises(ValueError, match="'cpt'"):
        train(tiny_model("llama", vocab_size=len(tok)), stream, CPT_OFFLINE, tmp_path / "x", seed=0, progress=False)


def test_mixsga_aux_loss_and_routing_stats_are_logged(tok, tmp_path):
    data = cpt_data(tok, TEXTS, 32)
    seen = []
    model = convert_to_mixsga(tiny_model("llama", vocab_size=len(tok)), MixSGAConfig(ratios=(3, 1, 6)))
    routers = {k: v.detach().clone() for k, v in model.named_parameters() if "router" in k}
    assert routers
    res = train(model, data, _cpt_recipe(max_steps=3), tmp_path, seed=0, progress=False, log=seen.append)
    assert len(res["aux_loss_history"]) == 3 and all(a > 0 for a in res["aux_loss_history"])
    assert [r["step"] for r in res["routing_history"]] == [1, 2, 3]
    # Statistics are reset every step: one step routes 4 sequences x 32 tokens in each of the 2 layers.
    last = res["routing_history"][-1]
    assert last["prefill_tokens"] == 2 * 4 * 32
    # expert-choice capacities per 32-token sequence: ceil(0.3 * 32) = 10, ceil(0.1 * 32) = 4, the rest 18
    assert last["prefill_fractions"] == pytest.approx([10 / 32, 4 / 32, 18 / 32])
    assert len(seen) == 3 and "routing" in seen[-1]
    params = dict(model.named_parameters())
    assert any(not torch.equal(v, params[k]) for k, v in routers.items())  # the aux loss trains the routers
    json.dumps(res, allow_nan=False)


VAL_TEXTS = [f"def g{i}(y):\n    return y - {i}  # held out {i}\n" for i in range(12)]


def test_held_out_curve_is_scored_and_resumes_identically(tok, tmp_path):
    # OPT with dropout: the curve must be scored without dropout and must not move any RNG.
    data, val = cpt_data(tok, TEXTS, 32), cpt_data(tok, VAL_TEXTS, 32, max_tokens=96)
    recipe = _cpt_recipe(max_steps=6)
    curve = Curve(val, points=3, batch_size=2)
    assert curve_steps(6, 3) == [0, 2, 4, 6] and curve_steps(2, 8) == [0, 1, 2]
    untrained = tiny_model("opt", vocab_size=len(tok), dropout=0.1).train()
    start_loss, scored = held_out_loss(untrained, val, batch_size=2, device=torch.device("cpu"))
    assert scored == len(val) * 31 and untrained.training  # mode restored
    straight_model = tiny_model("opt", vocab_size=len(tok), dropout=0.1)
    straight = train(straight_model, data, recipe, tmp_path / "a", seed=3, progress=False, curve=curve)
    points = straight["curve"]
    assert [p["step"] for p in points] == [0, 2, 4, 6]
    assert [p["tokens"] for p in points] == [0, 2 * 4 * 32, 4 * 4 * 32, 6 * 4 * 32]
    assert points[0]["loss"] == start_loss  # step 0 is the model before any update, in eval mode
    assert all(p["ppl"] == pytest.approx(math.exp(p["loss"])) for p in points)
    assert points[-1]["loss"] < points[0]["loss"]  # training on the same kind of text helps held-out loss
    assert straight["curve_time_s"] > 0

    # The curve changes nothing about training: same losses and weights without it.
    plain_model = tiny_model("opt", vocab_size=len(tok), dropout=0.1)
    plain = train(plain_model, data, recipe, tmp_path / "p", seed=3, progress=False)
    assert [h["loss"] for h in plain["history"]] == [h["loss"] for h in straight["history"]]
    assert plain["curve"] == []

    # Killed after step 3 (points 0 and 2 saved with the resume state), resumed: bit-identical.
    crashed = train(tiny_model("opt", vocab_size=len(tok), dropout=0.1), data, recipe, tmp_path / "b", seed=3,
                    progress=False, stop_after=3, curve=curve)
    assert [p["step"] for p in crashed["curve"]] == [0, 2]
    resumed_model = tiny_model("opt", seed=7, vocab_size=len(tok), dropout=0.1)
    resumed = train(resumed_model, data, recipe, tmp_path / "b", seed=3, progress=False, curve=curve)
    assert resumed["resumed_from"] == 3 and resumed["curve"] == points
    a, b = _params(straight_model), _params(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / RESULT_FILE).read_text())["curve"] == points
    # Another slice is another run: its checkpoint is not resumed with a different curve.
    other = Curve(cpt_data(tok, VAL_TEXTS[::-1], 32, max_tokens=96), points=3, batch_size=2)
    train(tiny_model("opt", vocab_size=len(tok)), data, recipe, tmp_path / "c", seed=3, progress=False,
          stop_after=1, curve=curve)
    with pytest.raises(ValueError, match="different run"):
        train(tiny_model("opt", vocab_size=len(tok)), data, recipe, tmp_path / "c", seed=3, progress=False,
              curve=other)


def test_sft_curve_scores_response_tokens_only(tok, tmp_path):
    val = sft_data(tok, ROWS[:4], 64)
    model = tiny_model("llama", vocab_size=len(tok))
    loss, scored = held_out_loss(model, val, batch_size=3, device=torch.device("cpu"))
    assert scored == sum(int((y[1:] != IGNORE_INDEX).sum()) for y in val.labels)
    # one example at a time gives the same token-weighted mean
    sums = []
    for i in range(len(val)):
        one_loss, one_n = held_out_loss(model, sft_data(tok, ROWS[i : i + 1], 64), batch_size=1,
                                        device=torch.device("cpu"))
        sums.append((one_loss * one_n, one_n))
    assert loss == pytest.approx(sum(a for a, _ in sums) / sum(n for _, n in sums), rel=1e-5)
    with pytest.raises(ValueError, match="points"):
        Curve(val, points=0)


def test_mixsga_random_router_curve_leaves_routing_rng_alone(tok, tmp_path):
    data, val = cpt_data(tok, TEXTS, 32), cpt_data(tok, VAL_TEXTS, 32, max_tokens=64)
    recipe = _cpt_recipe(max_steps=3)
    losses = []
    for curve in (None, Curve(val, points=3, batch_size=2)):
        model = convert_to_mixsga(tiny_model("llama", vocab_size=len(tok)),
                                  MixSGAConfig(ratios=(3, 1, 6), router="random"))
        res = train(model, data, recipe, tmp_path / str(curve is None), seed=0, progress=False, curve=curve)
        losses.append([h["loss"] for h in res["history"]])
    assert losses[0] == losses[1]


def test_bad_inputs_are_named(tok, tmp_path):
    data = cpt_data(tok, TEXTS, 32)
    with pytest.raises(ValueError, match="'sft'"):
        train(tiny_model("llama", vocab_size=len(tok)), data, SFT_OFFLINE, tmp_path, seed=0, progress=False)
    with pytest.raises(ValueError, match="seq_len 16"):
        train(tiny_model("llama", vocab_size=len(tok)), data, _cpt_recipe(seq_len=16), tmp_path, seed=0,
              progress=False)
    with pytest.raises(ValueError, match="fewer than one block"):
        cpt_data(tok, ["ab"], 64)


def test_recipes_follow_the_paper_and_scale_in_proportion():
    assert (CPT_PAPER.lr, CPT_PAPER.betas, CPT_PAPER.warmup_ratio, CPT_PAPER.weight_decay, CPT_PAPER.grad_clip,
            CPT_PAPER.precision) == (2e-4, (0.9, 0.95), 0.015, 0.1, 1.0, "bf16")
    assert CPT_PAPER.tokens_per_step == 256 * 1024 and CPT_PAPER.epochs == 1.0
    assert (SFT_PAPER_OPT.lr, SFT_PAPER_OPT.batch_size, SFT_PAPER_OPT.epochs) == (5e-5, 32, 40.0)
    for paper, offline in ((CPT_PAPER, CPT_OFFLINE), (SFT_PAPER_OPT, SFT_OFFLINE)):
        assert offline.kind == paper.kind
        for key in ("betas", "warmup_ratio", "weight_decay", "grad_clip", "min_lr_ratio"):
            assert getattr(offline, key) == getattr(paper, key), key
    assert set(RECIPES) == {"cpt_paper", "sft_paper_opt", "cpt_offline", "sft_offline"}
    assert Recipe.from_dict(CPT_OFFLINE.to_dict()) == CPT_OFFLINE
    assert get_recipe("cpt_offline", max_steps=3).num_steps(1) == 3
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("cpt_fast")
    with pytest.raises(ValueError, match="exactly one of"):
        Recipe(name="x", kind="cpt", lr=1e-3, epochs=1.0, max_steps=3)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        CPT_OFFLINE.replace(batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="kind"):
        CPT_OFFLINE.replace(kind="rl")
    with pytest.raises(ValueError, match="unknown recipe keys"):
        Recipe.from_dict({**CPT_OFFLINE.to_dict(), "learning_rate": 1})


def test_cpt_blocks_spread_over_the_whole_stream(tok):
    """``spread``: the blocks of ``max_tokens`` come evenly from the whole stream, not its first documents."""
    full = cpt_data(tok, TEXTS, 8)
    prefix = cpt_data(tok, TEXTS, 8, max_tokens=24)
    spread = cpt_data(tok, TEXTS, 8, max_tokens=24, spread=True)
    n = len(full.input_ids)
    assert n > 6 and len(prefix.input_ids) == len(spread.input_ids) == 3
    assert all(torch.equal(a, b) for a, b in zip(prefix.input_ids, full.input_ids[:3]))
    picks = [0, n // 3, 2 * n // 3]
    assert all(torch.equal(a, full.input_ids[i]) for a, i in zip(spread.input_ids, picks))
    assert spread.meta["spread_over_blocks"] == n
    assert cpt_data(tok, TEXTS, 8, max_tokens=24, spread=True).fingerprint == spread.fingerprint  # deterministic
