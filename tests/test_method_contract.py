"""The contract every registered method meets, run over the registry: a new method is tested by registering it.

Per method: the spec is torch-free; stored bytes equal the analytic budget; trained weights
save and reload; ``generate`` works with a batch and left padding; budgets the model cannot
store are refused with a clear message, by the spec (config time) and the implementation alike.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch

from baselines.testing import tiny_config, tiny_model
from conftest import REPO_ROOT
from harness.methods import SPECS, get_method, get_spec
from harness.orchestration.config import ConfigError, validate_config

NAMES = list(SPECS)
PROMPT = 40  # longer than SnapKV's window (32); 3:1:6 and keep 25 % of it are whole tokens


def _budget(name: str, heads: int) -> float:
    """A budget every method of its kind can store on the tiny model: derived, else 25 % evicting / 50 %."""
    spec = get_spec(name)
    try:
        return spec.budgets(None, {}, heads)[0]
    except ValueError:
        return 0.25 if spec.evicts else 0.5


def _built(name: str, seed: int = 0):
    model = tiny_model("llama", seed=seed)
    config = copy.deepcopy(model.config)
    method = get_method(name)
    params = method.params_for_budget(config, _budget(name, config.num_key_value_heads))
    return method.apply(model, params).eval(), config, method, params


def test_specs_are_torch_free():
    code = ("import sys\nfrom harness.methods import SPECS, get_spec\n"
            "for name in SPECS:\n"
            "    s = get_spec(name)\n"
            "    s.parse_params({}); s.train_key(0.5, {}); s.fields\n"
            "    try:\n        s.check_feasible(0.5, {}, 4)\n    except ValueError:\n        pass\n"
            "    assert s.label and s.color and s.marker and s.modules, name\n"
            "import harness.orchestration.config, analysis.style\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", NAMES)
def test_spec_facts(name):
    spec = get_spec(name)
    assert spec.name == name and get_method(name).spec is spec and get_method(name).name == name
    assert all(m.startswith(("harness.methods.", "mixsga", "baselines")) for m in spec.modules)
    assert spec.modules[0] == get_method(name).__module__  # the first module implements it
    with pytest.raises(ValueError, match=rf"method '{re.escape(name)}' takes no parameters \['bogus'\]"):
        spec.parse_params({"bogus": 1})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_spec("nope")


@pytest.mark.parametrize("name", NAMES)
def test_live_bytes_equal_the_analytic_budget(name):
    model, config, method, params = _built(name)
    ids = torch.randint(3, 97, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    cache = method.new_cache(model, params)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
    live = method.live_bytes(cache if cache is not None else out.past_key_values)
    analytic = method.analytic_bytes_per_token(config, params, torch.float32) * ids.numel()
    if get_spec(name).exact_bytes:
        assert live == analytic
    else:  # whole tokens of unequal byte cost fill the byte budget from below
        assert 0 < live <= analytic
    fields = get_spec(name).fields(params)
    assert set(fields) == {"architecture", "eviction", "keep", "variant", "architecture_params"}
    spec = get_spec(name)
    assert (fields["eviction"] is not None) == (spec.evicts and not spec.quantizes) == (fields["keep"] is not None)
    assert spec.evicts or not spec.quantizes  # a quantized cache acts only through the cache, as eviction does
    assert json.loads(json.dumps(params)) == params  # records store the params as JSON


@pytest.mark.parametrize("name", NAMES)
def test_trained_weights_save_and_reload(name, tmp_path):
    model, config, method, params = _built(name, seed=1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    again = method.apply(tiny_model("llama", seed=2), json.loads(json.dumps(params))).eval()
    again.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    ids = torch.randint(3, 97, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids, past_key_values=method.new_cache(model, params), use_cache=True).logits
        got = again(ids, past_key_values=method.new_cache(again, params), use_cache=True).logits
    assert torch.equal(ref, got)


@pytest.mark.parametrize("name", NAMES)
def test_generate_with_batch_and_left_padding(name):
    model, config, method, params = _built(name)
    ids = torch.randint(3, 97, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    kwargs = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=method.new_cache(model, params), **kwargs)
        alone = model.generate(ids[:1], attention_mask=mask[:1], past_key_values=method.new_cache(model, params),
                               **kwargs)
    assert out.shape == (2, PROMPT + 4)
    assert torch.equal(out[0], alone[0])  # the padded neighbour does not change the other sample


@pytest.mark.parametrize("name", NAMES)
def test_infeasible_budgets_are_refused_clearly(name):
    config = tiny_config("llama")  # 4 K/V heads, 2 layers
    method, spec = get_method(name), get_spec(name)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="budget must be in"):
            method.params_for_budget(config, bad)
    refused = []
    for budget in [i / 20 for i in range(1, 21)]:
        try:
            spec.check_feasible(budget, {}, config.num_key_value_heads)
        except ValueError as err:
            refused.append(budget)
            with pytest.raises(ValueError):  # what the spec refuses, the run refuses too
                method.params_for_budget(config, budget)
            where = r"experiments\.m\.runs\[0\]', model 'llama3': "
            with pytest.raises(ConfigError, match=where + re.escape(str(err)[:20])):
                validate_config({"experiments": {"m": {"runs": [{"method": name, "budgets": [budget]}]}}})
    if name in ("gqa", "mqa", "mixsga"):
        assert refused  # their budgets are fixed by the model's K/V heads
