"""Config schema: defaults, rejection of bad configs naming the key, the run grid, run specs."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO_ROOT
from harness.config import (
    ConfigError,
    budget_tag,
    code_hash,
    load_config,
    load_schema,
    make_run_id,
    merge_config,
    pretrain_settings,
    run_spec,
    run_table,
    validate_config,
)

DEFAULT = REPO_ROOT / "config" / "config.yaml"
PAPER = REPO_ROOT / "config" / "paper.yaml"
TEST = REPO_ROOT / ".test" / "config" / "config.yaml"


def test_empty_config_gets_every_default():
    cfg = validate_config({})
    assert cfg["profile"] == "offline"
    assert cfg["pretrain"]["steps"] == 720 and cfg["pretrain"]["lr"] == 0.002
    assert cfg["eval"]["text_set"] == "corpus" and cfg["eval"]["split"] == "test"
    assert cfg["methods"] == ["base"] and cfg["seeds"] == [0]
    assert cfg["models"] == [{"name": "llama3", "family": "llama3", "size": "tiny"}]


def test_defaults_are_not_shared_between_validations():
    first = validate_config({})
    first["models"].append({"name": "x", "family": "opt", "size": "tiny"})
    first["eval"]["seq_len"] = 7
    second = validate_config({})
    assert len(second["models"]) == 1 and second["eval"]["seq_len"] == 256


def test_validate_does_not_mutate_its_input():
    raw = {"pretrain": {"steps": 5}}
    validate_config(raw)
    assert raw == {"pretrain": {"steps": 5}}


@pytest.mark.parametrize(
    ("override", "key", "why"),
    [
        ({"pretrain": {"steps": -3}}, "pretrain.steps", "less than the minimum of 1"),
        ({"pretrian": {"steps": 3}}, "<top level>", "'pretrian' was unexpected"),
        ({"models": [{"name": "a", "family": "bert", "size": "tiny"}]}, "models[0].family", "'bert' is not one of"),
        ({"models": [{"name": "a_b", "family": "opt", "size": "tiny"}]}, "models[0].name", "does not match"),
        ({"models": [{"name": "a", "size": "tiny"}]}, "models[0]", "'family' is a required property"),
        ({"budgets": [1.5]}, "budgets[0]", "greater than the maximum of 1"),
        ({"methods": ["nope"]}, "methods[0]", "'nope' is not one of"),
        ({"seeds": [0, 0]}, "seeds", "non-unique"),
        ({"eval": {"seq_len": "long"}}, "eval.seq_len", "'long' is not of type 'integer'"),
        ({"device": "tpu"}, "device", "'tpu' is not one of"),
        ({"models": [{"name": "a", "family": "opt", "size": "tiny"}, {"name": "a", "family": "opt", "size": "tiny"}]},
         "models[1].name", "duplicate model name 'a'"),
        ({"models": [{"name": "a", "family": "opt", "size": "tiny", "hub": "facebook/opt-125m"}]},
         "models[0]", "exactly one of 'size'"),
        ({"models": [{"name": "a", "family": "opt"}]}, "models[0]", "exactly one of 'size'"),
        ({"eval": {"text_path": "/data/x"}}, "eval.text_path", "only used with a hub text set"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(override, key, why):
    with pytest.raises(ConfigError) as err:
        load_config([DEFAULT], override)
    message = str(err.value)
    assert f"config key '{key}'" in message
    assert why in message


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate_config({"threads": 0, "dtype": "float8"})
    assert "'threads'" in str(err.value) and "'dtype'" in str(err.value)


def test_shipped_configs_validate():
    offline = load_config([DEFAULT])
    assert offline["profile"] == "offline"
    assert {m["family"] for m in offline["models"]} == {"llama3", "tinyllama", "opt", "gemma2"}
    assert load_config([DEFAULT, TEST])["profile"] == "test"
    assert load_config([DEFAULT, PAPER])["profile"] == "paper"


def test_later_config_files_replace_lists_and_merge_mappings():
    paper = load_config([DEFAULT, PAPER])
    assert all("hub" in m for m in paper["models"]), "paper models must replace, not extend, the offline ones"
    assert paper["eval"]["text_set"] == "wikitext2"
    # a key only the default sets survives the merge
    assert paper["data"] == load_config([DEFAULT])["data"]
    merged = merge_config({"a": {"b": 1, "c": 2}, "l": [1, 2]}, {"a": {"b": 3}, "l": [9]})
    assert merged == {"a": {"b": 3, "c": 2}, "l": [9]}


def test_config_file_must_hold_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config([bad])


def test_model_pretrain_entry_overrides_the_default():
    cfg = load_config([DEFAULT], {"models": [{"name": "a", "family": "opt", "size": "tiny", "pretrain": {"steps": 9}},
                                             {"name": "b", "family": "opt", "size": "tiny"}]})
    assert pretrain_settings(cfg, "a") == {**cfg["pretrain"], "steps": 9}
    assert pretrain_settings(cfg, "b") == cfg["pretrain"]
    with pytest.raises(ConfigError, match="config key 'models\\[0\\].pretrain.steps'"):
        load_config([DEFAULT], {"models": [{"name": "a", "family": "opt", "size": "tiny", "pretrain": {"steps": 0}}]})
    with pytest.raises(ConfigError, match="comes from the hub"):
        load_config([DEFAULT], {"models": [{"name": "a", "family": "opt", "hub": "x/y", "pretrain": {"steps": 3}}]})


def test_offline_default_uses_the_tuned_recipes():
    from harness.pretrain import OFFLINE_RECIPES

    cfg = load_config([DEFAULT])
    for model in cfg["models"]:
        settings = pretrain_settings(cfg, model["name"])
        recipe = OFFLINE_RECIPES[model["family"]]
        assert {k: settings[k] for k in recipe} == recipe, model["name"]


def test_family_enum_matches_the_zoo():
    from harness.zoo import FAMILIES

    enum = load_schema()["properties"]["models"]["items"]["properties"]["family"]["enum"]
    assert sorted(enum) == sorted(FAMILIES)


def test_method_enum_matches_the_registry():
    methods = pytest.importorskip("harness.methods", reason="method registry not written yet")
    enum = load_schema()["properties"]["methods"]["items"]["enum"]
    for name in enum:
        if name != "base":
            methods.get_method(name)  # raises for a name the registry does not know


def test_grid_expands_model_method_budget_seed():
    cfg = load_config([DEFAULT], {"seeds": [0, 1, 2]})
    rows = run_table(cfg)
    assert len(rows) == 4 * 3  # 4 models x base x 3 seeds (base runs at budget 1.0 only)
    assert len({r["run_id"] for r in rows}) == len(rows)
    assert {r["budget"] for r in rows} == {1.0}
    assert rows[0]["run_id"] == "llama3__base__kv100__s0"
    assert {r["source"] for r in rows} == {"pretrained"}


def test_grid_of_shipped_configs():
    assert len(run_table(load_config([DEFAULT]))) == 4
    assert len(run_table(load_config([DEFAULT, TEST]))) == 2
    paper = run_table(load_config([DEFAULT, PAPER]))
    assert len(paper) == 7 and paper[0]["source"] == "facebook/opt-125m"


def test_run_ids_and_budget_tags():
    assert budget_tag(1.0) == "kv100"
    assert budget_tag(0.5) == "kv50"
    assert budget_tag(0.375) == "kv37.5"
    assert budget_tag(0.35) == "kv35"
    assert make_run_id("opt-125m", "mixsga", 0.5, 3) == "opt-125m__mixsga__kv50__s3"


def test_run_spec_holds_what_determines_the_run():
    cfg = load_config([DEFAULT])
    spec = run_spec(cfg, "opt__base__kv100__s0")
    assert spec["model"] == {"name": "opt", "family": "opt", "size": "tiny", "pretrain": {"lr": 0.0005}}
    assert spec["pretrain"] == {**cfg["pretrain"], "lr": 0.0005} and spec["tokenizer"] == cfg["tokenizer"]
    assert spec["eval"] == cfg["eval"] and spec["seed"] == 0 and spec["budget"] == 1.0
    # a hub model does not depend on the local pretraining recipe
    hub = run_spec(load_config([DEFAULT, PAPER]), "opt-125m__base__kv100__s0")
    assert "pretrain" not in hub and "tokenizer" not in hub
    # adding a seed does not change an existing run's spec (so it is not rerun)
    more = load_config([DEFAULT], {"seeds": [0, 1]})
    assert run_spec(more, "opt__base__kv100__s0") == spec


def test_run_spec_rejects_unknown_run_id():
    with pytest.raises(ConfigError, match="not in the grid"):
        run_spec(load_config([DEFAULT]), "opt__base__kv50__s0")


def test_code_hash_follows_file_contents(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    before = code_hash(["pkg", "b.py"], root=tmp_path)
    assert code_hash(["pkg", "b.py"], root=tmp_path) == before
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert code_hash(["pkg", "b.py"], root=tmp_path) != before
    assert code_hash(["missing.py"], root=tmp_path) != code_hash(["b.py"], root=tmp_path)


def test_schema_documents_every_top_level_key():
    schema = load_schema()
    for key, prop in schema["properties"].items():
        assert "default" in prop, f"top-level key {key!r} has no default"
    # the shipped default config sets no key the schema does not know
    raw = yaml.safe_load(DEFAULT.read_text())
    assert set(raw) <= set(schema["properties"])
