"""lm-evaluation-harness from its own command line on a converted checkpoint (issue 13, item 3).

A mixSGA model saved with ``save_converted`` is scored by the ``lm_eval`` console script
(``--model hf``, ``--trust_remote_code``: the checkpoint's ``auto_map`` loads it through the
installed package) on the suite's offline local tasks (``--include_path``), and gets exactly
the numbers :func:`harness.evaluation.lm_eval_adapter.evaluate_lm` gets in process; the base
model's numbers differ, so the command line did score the converted model. Offline:
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and a fresh ``HF_HOME``.

Most of the ~20 s is the command line indexing lm-eval's built-in task registry, which it
always does.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from baselines.testing import tiny_model
from harness.evaluation.lm_eval_adapter import LOCAL_MC_TASK, LOCAL_PPL_TASK, build_local_tasks, evaluate_lm
from mixsga import MixSGAConfig, convert_to_mixsga, save_converted

REPO_ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = Path(sys.executable).with_name("lm_eval")  # the console script of the pinned lm-eval
TEXTS = [(f"def f{i}(x):\n    return x * {i} + {i * i}  # value number {i}\n") * 2 for i in range(10)]
METRICS = {LOCAL_MC_TASK: ("acc", "acc_norm"), LOCAL_PPL_TASK: ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def test_lm_eval_command_line_scores_a_converted_checkpoint_like_the_adapter(tiny_tokenizer, tmp_path, monkeypatch):
    # evaluate_lm sets these itself; setting them here first makes monkeypatch restore them afterwards.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert LM_EVAL.is_file(), f"lm-eval's console script is missing at {LM_EVAL} (lm-eval is a pinned dependency)"
    tok = tiny_tokenizer(TEXTS)
    base = tiny_model("llama", vocab_size=len(tok))
    model = convert_to_mixsga(copy.deepcopy(base), MixSGAConfig(ratios=(3, 1, 6)))
    ckpt = save_converted(model, tmp_path / "ckpt", tok)
    task_dir = tmp_path / "tasks"
    tasks = build_local_tasks(TEXTS, task_dir, context_chars=50, continuation_chars=16, max_mc_items=6,
                              max_ppl_docs=3)
    for task in tasks:  # the adapter's task dicts, as the YAML files --include_path reads
        (task_dir / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    # One command for both tasks needs one <bos> setting: add_bos_token=False, i.e. the adapter's bos=False.
    want = evaluate_lm(model, tok, tasks, batch_size=4, bos=False, max_length=128)["results"]
    base_ppl = evaluate_lm(base, tok, tasks[1:], batch_size=4, bos=False, max_length=128)["results"]

    out = tmp_path / "out"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(LM_EVAL), "run", "--model", "hf",
           "--model_args", f"pretrained={ckpt},add_bos_token=False,max_length=128,dtype=float32",
           "--tasks", f"{LOCAL_MC_TASK},{LOCAL_PPL_TASK}", "--include_path", str(task_dir), "--trust_remote_code",
           "--batch_size", "4", "--device", "cpu", "--seed", "0", "--output_path", str(out)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    got = json.loads(results_file.read_text())["results"]
    for task, metrics in METRICS.items():
        for metric in metrics:
            assert got[task][f"{metric},none"] == pytest.approx(want[task][metric], rel=1e-9), (task, metric)
    assert got[LOCAL_PPL_TASK]["word_perplexity,none"] != pytest.approx(
        base_ppl[LOCAL_PPL_TASK]["word_perplexity"], rel=1e-3)  # the routers really ran
