"""Converted checkpoints that say what they are (issue 13, item 1).

Every converted method on every zoo family (tiny sizes, four layers): ``save_converted``
writes a Hugging Face directory whose config names the conversion's own model type; with
the packages imported ``AutoModelForCausalLM`` returns the converted model (same logits as
the in-memory model and as ``load_mixsga`` / ``load_converted``; same greedy generation);
plain transformers in a fresh process refuses it with its remote-code error; the
``trust_remote_code=True`` route in a fresh process gives the same logits. GQA / MQA on
Llama and Gemma 2 stays a plain checkpoint that plain transformers loads correctly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from baselines import convert_to_cla, convert_to_gqa, load_converted, plan_cla
from baselines.hf import check_savable, save_converted
from harness.models.zoo import build_config
from hfconvert.softcap_attention import ATTN_NAME as SOFTCAP_FUSED
from mixsga import MixSGAConfig, convert_to_mixsga, load_mixsga
from mixsga.hf import SHIM_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"checkpoint {i} says what it is: {'abc ' * (i % 5)} and {i * 7} more words\n" for i in range(40)]
#: The error plain transformers raises for a directory whose config.json names custom code.
REFUSAL = "contains custom code which must be executed to correctly load the model"

# case id -> (zoo family, method, argument, model type config.json records, base model type)
CASES = {
    "mixsga-llama3": ("llama3", "mixsga", (3, 1, 6), "mixsga_llama", "llama"),
    "mixsga-tinyllama": ("tinyllama", "mixsga", (3, 1, 6), "mixsga_llama", "llama"),
    "mixsga-opt": ("opt", "mixsga", (3, 1, 6), "mixsga_opt", "opt"),
    "mixsga-gemma2": ("gemma2", "mixsga", (3, 1, 6), "mixsga_gemma2", "gemma2"),
    "gqa-opt": ("opt", "gqa", 2, "gqa_opt", "opt"),
    "mqa-opt": ("opt", "gqa", 1, "gqa_opt", "opt"),
    "gqa-llama3": ("llama3", "gqa", 2, "llama", "llama"),
    "mqa-gemma2": ("gemma2", "gqa", 1, "gemma2", "gemma2"),
    "cla-llama3": ("llama3", "cla", 0.5, "cla_llama", "llama"),
    "cla-tinyllama": ("tinyllama", "cla", 0.5, "cla_llama", "llama"),
    "cla-opt": ("opt", "cla", 0.25, "cla_opt", "opt"),  # pairs plus halved K/V heads (GQA inside CLA)
    "cla-gemma2": ("gemma2", "cla", 0.5, "cla_gemma2", "gemma2"),
}
NATIVE = {"gqa-llama3", "mqa-gemma2"}


def build(family: str, method: str, arg, tok, seed: int = 0):
    """A tiny zoo model of ``family`` converted by ``method``; weights widened so routing and K/V matter."""
    overrides = {"num_hidden_layers": 4, "hidden_size": 64, "max_position_embeddings": 128}
    overrides.update(ffn_dim=128, word_embed_proj_dim=64) if family == "opt" else overrides.update(intermediate_size=128)
    if family == "gemma2":
        overrides.update(sliding_window=8)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tok, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 0.5)
    if method == "mixsga":
        return convert_to_mixsga(model, MixSGAConfig(ratios=arg))
    if method == "gqa":
        return convert_to_gqa(model, arg)
    return convert_to_cla(model, plan_cla(model.config, arg))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """Every case converted and saved once: ``{case: (model, dir)}``, plus ``expected.pt`` (logits, generations)."""
    root = tmp_path_factory.mktemp("ckpts")
    out, expected = {}, {}
    for case, (family, method, arg, _, _) in CASES.items():
        model = build(family, method, arg, tok)
        path = save_converted(model, root / case.replace("-", "_"), tok)
        ids = _ids(len(tok))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            generated = model.generate(ids[:, :6], max_new_tokens=5, do_sample=False)
        expected[str(path)] = {"ids": ids, "logits": logits, "generated": generated, "case": case}
        out[case] = (model, path)
    torch.save(expected, root / "expected.pt")
    out["_root"] = root
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_directory_names_its_own_model_type(saved, case):
    _, path = saved[case]
    _, _, _, model_type, _ = CASES[case]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == model_type
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    if case in NATIVE:
        assert "auto_map" not in config and not (path / SHIM_FILE).exists()
        return
    assert config["architectures"][0].endswith("ForCausalLM") and config["architectures"][0] != "LlamaForCausalLM"
    stem = Path(SHIM_FILE).stem
    assert config["auto_map"]["AutoModelForCausalLM"] == f"{stem}.{config['architectures'][0]}"
    shim = (path / SHIM_FILE).read_text()
    assert config["auto_map"]["AutoConfig"].split(".")[1] in shim and "import" in shim


@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_class_reloads_the_converted_model(saved, case, tok):
    model, path = saved[case]
    _, method, _, _, base_type = CASES[case]
    ids = _ids(len(tok))
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()  # no kwargs: Gemma 2 gets eager from config.json
    today = load_mixsga(str(path)) if method == "mixsga" else load_converted(path)
    assert type(reloaded) is type(model) and type(today) is type(model)
    assert reloaded.config.model_type == base_type  # in memory: the family, for family-keyed code
    # A plain Gemma 2 reloads on transformers' eager function, the suite's model (and the suite's
    # loader) ran its fused equivalent: equal to fp32 rounding; everything else exactly.
    fused = model.config._attn_implementation == SOFTCAP_FUSED
    tol = {"atol": 2e-5, "rtol": 1e-5} if fused else {"atol": 0, "rtol": 0}
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, **tol)
        torch.testing.assert_close(today.eval()(input_ids=ids).logits, want, atol=0, rtol=0)
        a = model.generate(ids[:, :6], max_new_tokens=5, do_sample=False)
        b = reloaded.generate(ids[:, :6], max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    # The attention implementation round-trips: "mixsga" over the recorded base, or the baseline's kernel
    # (Gemma 2's fused soft-capped kernel is recorded, and reloaded, as the eager function it computes;
    # the CLA layers run the fused one for "eager" too, hence the exact logits above).
    from hfconvert import RECORDED_AS

    assert reloaded.config._attn_implementation == RECORDED_AS.get(model.config._attn_implementation,
                                                                   model.config._attn_implementation)
    if method == "mixsga":
        assert reloaded.config._attn_implementation == "mixsga"
        assert reloaded.config.mixsga == model.config.mixsga
        assert reloaded.mixsga_runtime.config == model.mixsga_runtime.config


def _run(script: str, tmp_path: Path, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter (no stdin, offline, own HF cache); it writes ``out.json``."""
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "out.json"), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


FRESH = """
import json, os, sys
import torch
from transformers import AutoModelForCausalLM

expected = torch.load(sys.argv[2], weights_only=True)
plain, remote = {}, {}
# 1. Plain transformers, nothing of ours imported: the default (a y/N prompt, refused without a
#    terminal) and lm-eval's default trust_remote_code=False.
for path, exp in expected.items():
    row = plain[exp["case"]] = {}
    for trust in (None, False):
        kwargs = {}
        if trust is not None:
            kwargs["trust_remote_code"] = trust
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        except ValueError as exc:
            row[str(trust)] = {"error": type(exc).__name__ + ": " + str(exc)}
        else:
            with torch.no_grad():
                diff = (model(input_ids=exp["ids"]).logits - exp["logits"]).abs().max().item()
            row[str(trust)] = {"class": type(model).__name__, "max_diff": diff}
imported = sorted(m for m in ("mixsga", "baselines", "harness") if m in sys.modules)
# 2. trust_remote_code=True. mixSGA first: importing baselines imports mixsga, so in this order
#    the first load of each package goes purely through the shim saved beside the weights.
for path, exp in sorted(expected.items(), key=lambda kv: (not kv[1]["case"].startswith("mixsga"), kv[1]["case"])):
    package = "mixsga" if exp["case"].startswith("mixsga") else "baselines"
    fresh = package not in sys.modules
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        diff = (model(input_ids=exp["ids"]).logits - exp["logits"]).abs().max().item()
        generated = model.generate(exp["ids"][:, :6], max_new_tokens=5, do_sample=False)
    remote[exp["case"]] = {"class": type(model).__name__, "max_diff": diff, "fresh": fresh,
                           "same_generation": bool(torch.equal(generated, exp["generated"]))}
    if fresh:  # saving again after the remote-code route still writes the shim, not a copy of our module
        again = os.path.join(sys.argv[3], exp["case"])
        model.save_pretrained(again)
        remote[exp["case"]]["resaved"] = {"files": sorted(os.listdir(again)),
                                          "auto_map": json.load(open(os.path.join(again, "config.json")))["auto_map"]}
json.dump({"plain": plain, "imported_by_plain": imported, "remote": remote}, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def fresh_process(saved, tmp_path_factory):
    """One fresh interpreter (one torch import) for both the plain and the remote-code route."""
    tmp = tmp_path_factory.mktemp("fresh")
    return _run(FRESH, tmp, str(saved["_root"] / "expected.pt"), str(tmp / "resaved"))


def test_plain_transformers_refuses_converted_checkpoints_loudly(fresh_process):
    assert fresh_process["imported_by_plain"] == []
    report = fresh_process["plain"]
    assert set(report) == set(CASES)
    for case, row in report.items():
        for trust, outcome in row.items():
            if case in NATIVE:  # a plain transformers checkpoint: loads correctly anywhere
                # (Gemma 2: on transformers' eager function, the suite ran its fused equivalent)
                assert outcome.get("max_diff") <= (2e-5 if "gemma2" in case else 0.0), (case, outcome)
            else:
                assert outcome.get("error", "").startswith("ValueError"), (case, trust, outcome)
                assert REFUSAL in outcome["error"] and "trust_remote_code=True" in outcome["error"]


def test_trust_remote_code_route_gives_the_same_model(saved, fresh_process):
    report = fresh_process["remote"]
    assert set(report) == set(CASES)
    for case, row in report.items():
        model, _ = saved[case]
        assert row["class"] == type(model).__name__, (case, row)
        # a plain Gemma 2 reloads on transformers' eager function, the suite ran its fused equivalent
        plain_gemma = case in NATIVE and "gemma2" in case
        assert row["max_diff"] <= (2e-5 if plain_gemma else 0.0) and row["same_generation"], (case, row)
    assert report["mixsga-gemma2"]["fresh"] and report["cla-gemma2"]["fresh"]  # the first of each package
    for case in ("mixsga-gemma2", "cla-gemma2"):
        resaved = report[case]["resaved"]
        assert resaved["files"] == ["config.json", SHIM_FILE, "generation_config.json", "model.safetensors"]
        assert resaved["auto_map"] == json.loads((saved[case][1] / "config.json").read_text())["auto_map"]


def test_loading_is_strict_about_converted_weights(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved["mixsga-llama3"]
    broken = tmp_path / "no_routers"
    shutil.copytree(path, broken)
    state = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in state.items() if "mixsga_router" not in k}, broken / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing .*mixsga_router"):
        AutoModelForCausalLM.from_pretrained(broken)
    with pytest.raises(ValueError, match="missing .*mixsga_router"):
        load_mixsga(str(broken))


@pytest.mark.parametrize("case", ["mixsga-gemma2", "gqa-opt", "cla-opt"])
def test_old_format_directories_still_load(saved, case, tmp_path, tok):
    """Directories written before the checkpoint types (config names the base type) keep loading."""
    model, path = saved[case]
    _, method, _, _, base_type = CASES[case]
    old = tmp_path / "old"
    shutil.copytree(path, old)
    (old / SHIM_FILE).unlink()
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]
    config["model_type"] = base_type
    config["architectures"] = [type(model).__mro__[3].__name__]
    config.pop("attn_implementation", None)
    (old / "config.json").write_text(json.dumps(config))
    loaded = load_mixsga(str(old)) if method == "mixsga" else load_converted(old)
    ids = _ids(len(tok))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert type(loaded) is type(model)  # and it now saves in the new format


def test_unrecordable_conversions_are_refused(tok, tmp_path):
    gqa_opt = build("opt", "gqa", 2, tok)
    with pytest.raises(ValueError, match="gqa-converted model cannot also be converted by mixsga"):
        convert_to_mixsga(gqa_opt, MixSGAConfig(ratios=(1, 1), group_sizes=(1, 2)))
    lost = build("llama3", "mixsga", (3, 1, 6), tok)
    lost.config.__class__ = LlamaConfig  # a mark lost (e.g. a config replaced by hand)
    with pytest.raises(ValueError, match=r"carries \['mixsga'\]"):
        save_converted(lost, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    check_savable(build("llama3", "gqa", 2, tok))  # native GQA records itself


@pytest.mark.parametrize("case", ["mixsga-gemma2", "cla-opt"])
def test_zoo_loader_returns_the_converted_model(saved, case, tok):
    """``load_base_model`` (the harness's loader, Gemma 2 on eager) opens a converted directory as what it is."""
    from harness.models.zoo import load_base_model

    model, path = saved[case]
    loaded, loaded_tok = load_base_model(path)
    assert type(loaded) is type(model) and len(loaded_tok) == len(tok)
    ids = _ids(len(tok))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
