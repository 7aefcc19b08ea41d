"""Config schema: defaults, rejection of bad configs naming the key, the run grid, run specs."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO_ROOT
from kvledger import kv_budget
from harness.orchestration.config import (
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
    train_table,
    validate_config,
    write_run_table,
)

DEFAULT = REPO_ROOT / "config" / "config.yaml"
PAPER = REPO_ROOT / "config" / "paper.yaml"
GPU = REPO_ROOT / "config" / "gpu.yaml"
FULL = REPO_ROOT / "config" / "full.yaml"
TEST = REPO_ROOT / ".test" / "config" / "config.yaml"


def test_empty_config_gets_every_default():
    cfg = validate_config({})
    assert cfg["profile"] == "offline"
    assert cfg["pretrain"]["steps"] == 720 and cfg["pretrain"]["lr"] == 0.002
    assert cfg["eval"]["text_set"] == "corpus" and cfg["eval"]["split"] == "test"
    assert cfg["experiments"] == {"main": {"training": "none", "evaluate": ["ppl"], "runs": [{"method": "base"}]}}
    assert cfg["seeds"] == [0] and cfg["measure"]["repeats"] == 5 and cfg["training"]["cpt"]["recipe"] == "cpt_offline"
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
        ({"experiments": {"main": {"runs": [{"method": "gqa", "budgets": [1.5]}]}}},
         "experiments.main.runs[0].budgets[0]", "greater than the maximum of 1"),
        ({"experiments": {"main": {"runs": [{"method": "nope"}]}}}, "experiments.main.runs[0].method",
         "unknown method 'nope'"),
        ({"experiments": {"main": {"runs": [{"method": "gqa"}]}}}, "experiments.main.runs[0]", "needs budgets"),
        ({"experiments": {"main": {"runs": [{"method": "base", "budgets": [0.5]}]}}}, "experiments.main.runs[0]",
         "always runs at budget 1.0"),
        ({"experiments": {"main": {"models": ["gpt"], "runs": [{"method": "base"}]}}}, "experiments.main.models",
         "unknown model 'gpt'"),
        ({"experiments": {"main": {"training": "lora", "runs": [{"method": "base"}]}}}, "experiments.main.training",
         "'lora' is not one of"),
        ({"experiments": {"main": {"evaluate": ["rouge"], "runs": [{"method": "base"}]}}},
         "experiments.main.evaluate", "needs an instruction-tuned model"),
        ({"measure": {"repeats": 3}}, "measure.repeats", "less than the minimum of 5"),
        ({"seeds": [0, 0]}, "seeds", "non-unique"),
        ({"eval": {"seq_len": "long"}}, "eval.seq_len", "'long' is not of type 'integer'"),
        ({"device": "tpu"}, "device", "'tpu' is not one of"),
        ({"models": [{"name": "a", "family": "opt", "size": "tiny"}, {"name": "a", "family": "opt", "size": "tiny"}]},
         "models[1].name", "duplicate model name 'a'"),
        ({"models": [{"name": "a", "family": "opt", "size": "tiny", "hub": "facebook/opt-125m"}]},
         "models[0]", "exactly one of 'size'"),
        ({"models": [{"name": "a", "family": "opt"}]}, "models[0]", "exactly one of 'size'"),
        ({"datasets": {"dolly": {"path": "/no/such/dolly.jsonl"}}}, "datasets.dolly.path", "local data not found"),
        ({"eval": {"instruct": {"path": "/data/x"}}}, "eval.instruct", "'path' was unexpected"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(override, key, why):
    raw = {"models": [{"name": "llama3", "family": "llama3", "size": "tiny"}]}
    with pytest.raises(ConfigError) as err:
        validate_config(merge_config(raw, override))
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
    assert load_config([DEFAULT, GPU])["profile"] == "gpu"


def test_later_config_files_replace_lists_and_merge_mappings():
    paper = load_config([DEFAULT, PAPER])
    assert all("hub" in m for m in paper["models"]), "paper models must replace, not extend, the offline ones"
    assert paper["eval"]["text_set"] == "wikitext2"
    # a key only the default sets survives the merge
    assert paper["data"] == load_config([DEFAULT])["data"]
    merged = merge_config({"a": {"b": 1, "c": 2}, "l": [1, 2]}, {"a": {"b": 3}, "l": [9]})
    assert merged == {"a": {"b": 3, "c": 2}, "l": [9]}


def _file(path):
    return yaml.safe_load(path.read_text())


def test_paper_profile_trains_with_the_paper_recipes_and_no_offline_value():
    from harness.training.recipes import CPT_PAPER, SFT_PAPER_OPT, get_recipe

    offline = _file(DEFAULT)["training"]
    trains = train_table(load_config([DEFAULT, PAPER]))
    kinds = {spec["kind"] for spec in trains.values()}
    assert kinds == {"cpt", "sft"}
    for train_id, spec in trains.items():
        paper = CPT_PAPER if spec["kind"] == "cpt" else SFT_PAPER_OPT
        assert spec["recipe"] == paper.name, train_id
        assert spec["overrides"] == {}, f"{train_id}: offline overrides leaked into the paper profile"
        assert get_recipe(spec["recipe"], **spec["overrides"]) == paper
        # no value of the offline profile's training section survives
        for key, value in offline[spec["kind"]].items():
            if key != "overrides":
                assert spec.get(key) != value or value is None, f"{train_id}: offline {key}={value!r} survives"
    cpt = get_recipe(CPT_PAPER.name)
    # Table 7: one epoch of MiniPile (~1.6B tokens) in 256K-token batches at lr 2e-4
    assert (cpt.lr, cpt.batch_size, cpt.seq_len, cpt.epochs) == (2e-4, 128, 2048, 1.0)
    sft = get_recipe(SFT_PAPER_OPT.name)
    assert (sft.lr, sft.batch_size, sft.epochs) == (5e-5, 32, 40.0)
    assert {s["data"] for s in trains.values()} == {"minipile", "dolly"}


def test_gpu_profile_trains_with_its_own_overrides_only():
    from harness.training.recipes import get_recipe

    gpu, offline = _file(GPU)["training"], _file(DEFAULT)["training"]
    trains = train_table(load_config([DEFAULT, GPU]))
    assert {spec["kind"] for spec in trains.values()} == {"cpt", "sft"}
    for train_id, spec in trains.items():
        kind = spec["kind"]
        assert spec["overrides"] == gpu[kind]["overrides"], train_id
        recipe_name = gpu[kind].get("recipe", offline[kind]["recipe"])
        assert get_recipe(spec["recipe"], **spec["overrides"]) == get_recipe(recipe_name, **gpu[kind]["overrides"])
    # the offline CPT lr (2e-4, tuned for 12 steps) does not reach the GPU profile's 256 steps
    cpt = next(s for s in trains.values() if s["kind"] == "cpt")
    assert "lr" not in cpt["overrides"] and get_recipe(cpt["recipe"], **cpt["overrides"]).lr == 1e-3


def test_recipe_overrides_and_experiments_replace_whole():
    base = {"training": {"cpt": {"recipe": "a", "overrides": {"lr": 1, "seq_len": 2}}},
            "experiments": {"x": {"models": ["m"], "evaluate": ["ppl"], "runs": [1]}}, "eval": {"a": 1, "b": 2}}
    merge_config(base, {"training": {"cpt": {"recipe": "b", "overrides": {"seq_len": 3}}},
                        "experiments": {"x": {"runs": [2]}}, "eval": {"b": 3}})
    assert base["training"]["cpt"] == {"recipe": "b", "overrides": {"seq_len": 3}}
    assert base["experiments"]["x"] == {"runs": [2]}
    assert base["eval"] == {"a": 1, "b": 3}  # other mappings still merge key by key


def test_config_file_must_hold_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config([bad])


def test_model_pretrain_entry_overrides_the_default():
    cfg = validate_config({"models": [{"name": "a", "family": "opt", "size": "tiny", "pretrain": {"steps": 9}},
                                      {"name": "b", "family": "opt", "size": "tiny"}]})
    assert pretrain_settings(cfg, "a") == {**cfg["pretrain"], "steps": 9}
    assert pretrain_settings(cfg, "b") == cfg["pretrain"]
    with pytest.raises(ConfigError, match="config key 'models\\[0\\].pretrain.steps'"):
        validate_config({"models": [{"name": "a", "family": "opt", "size": "tiny", "pretrain": {"steps": 0}}]})
    with pytest.raises(ConfigError, match="comes from the hub"):
        validate_config({"models": [{"name": "a", "family": "opt", "hub": "x/y", "pretrain": {"steps": 3}}]})


def test_offline_default_uses_the_tuned_recipes():
    from harness.training.pretrain import OFFLINE_RECIPES

    cfg = load_config([DEFAULT])
    for model in cfg["models"]:
        settings = pretrain_settings(cfg, model["name"])
        recipe = OFFLINE_RECIPES[model["family"]]
        assert {k: settings[k] for k in recipe} == recipe, model["name"]


def test_family_enum_matches_the_zoo():
    from harness.models.zoo import FAMILIES

    enum = load_schema()["properties"]["models"]["items"]["properties"]["family"]["enum"]
    assert sorted(enum) == sorted(FAMILIES)


def test_method_names_are_checked_against_the_registry():
    import re

    from harness.methods import SPECS

    pattern = load_schema()["properties"]["experiments"]["additionalProperties"]["properties"]["runs"]["items"]
    regex = re.compile(pattern["properties"]["method"]["pattern"])
    assert {m for m in SPECS if regex.fullmatch(m)} == set(SPECS)
    for bad in ("h2o+cla", "gqa+mixsga"):  # well-formed names the registry does not know
        with pytest.raises(ConfigError, match=rf"runs\[0\].method': unknown method '{re.escape(bad)}'; known: base"):
            validate_config({"experiments": {"m": {"runs": [{"method": bad, "budgets": [0.5]}]}}})
    with pytest.raises(ConfigError, match=r"runs\[0\].params': method 'gqa' takes no parameters \['ratios'\]"):
        validate_config({"experiments": {"m": {"runs": [{"method": "gqa", "budgets": [0.5],
                                                         "params": {"ratios": [1, 1, 2]}}]}}})


def _cfg(experiments, models=("llama3", "gemma2"), seeds=(0,)):
    return validate_config({"models": [{"name": m, "family": m, "size": "tiny"} for m in models],
                            "seeds": list(seeds), "experiments": experiments})


def test_experiments_expand_once_and_share_runs():
    cfg = _cfg({
        "main": {"training": "cpt", "runs": [{"method": "base"}, {"method": "mixsga", "budgets": [0.25, 0.5]},
                                             {"method": "h2o", "budgets": [0.5]}]},
        "table2_cpt": {"models": ["llama3"], "training": "cpt", "evaluate": ["ppl", "zeroshot"],
                       "runs": [{"method": "mixsga", "budgets": [0.5]}]},
        "table3_eviction_stack": {"models": ["llama3"], "training": "cpt",
                                  "runs": [{"method": "h2o+mixsga", "budgets": [0.4, 0.2]}]},
    }, seeds=(0, 1))
    rows = run_table(cfg)
    ids = [r["run_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 2 * 4 * 2 + 2 * 2  # (base, mixsga x2, h2o) x 2 models x 2 seeds + stacked
    shared = {r["run_id"]: r for r in rows}["llama3__cpt__mixsga__kv50__s1"]
    assert shared["experiments"] == ["main", "table2_cpt"] and shared["evaluate"] == ["ppl", "zeroshot"]
    assert {r["run_id"]: r for r in rows}["gemma2__cpt__mixsga__kv50__s1"]["evaluate"] == ["ppl"]
    # eviction shares the checkpoint of the model it runs on: base, or mixSGA at the inner 50 %
    by_id = {r["run_id"]: r for r in rows}
    assert by_id["llama3__cpt__h2o__kv50__s0"]["train_id"] == "llama3__cpt__base__kv100__s0"
    assert by_id["llama3__cpt__h2o+mixsga__kv20__s0"]["train_id"] == "llama3__cpt__mixsga__kv50__s0"
    trains = train_table(cfg, rows)
    assert len(trains) == 2 * 3 * 2  # base, mixsga 25, mixsga 50 per model and seed
    assert trains["llama3__cpt__mixsga__kv50__s0"]["architecture"] == {"method": "mixsga", "budget": 0.5, "params": {}}
    # the expansion is deterministic
    assert run_table(cfg) == rows


def test_explicit_params_name_the_run_and_set_the_budget():
    cfg = _cfg({"t5": {"models": ["llama3"], "training": "sft", "evaluate": ["ppl", "rouge"], "runs": [
        {"method": "mixsga", "params": {"ratios": [1, 9, 2]}},
        {"method": "mixsga", "params": {"ratios": [3, 4], "group_sizes": [1, 2]}},
        {"method": "mixsga", "params": {"ratios": [3, 1, 6], "router": "random"}},
        {"method": "mixsga", "params": {"ratios": [3, 1, 6], "router_grad": "straight_through"}},
    ]}})
    rows = run_table(cfg)
    assert [r["run_id"] for r in rows] == [
        "llama3__sft__mixsga-r1.9.2__kv50__s0",
        "llama3__sft__mixsga-g1.2-r3.4__kv71.43__s0",
        "llama3__sft__mixsga-r3.1.6-routerrandom__kv50__s0",
        "llama3__sft__mixsga-r3.1.6-routergradstraightthrough__kv50__s0",
    ]
    assert rows[1]["budget"] == pytest.approx(5 / 7)
    assert kv_budget([1, 2], [1, 2]) == pytest.approx(2 / 3) and kv_budget([0, 0, 1]) == 0.25


def test_mqa_budget_is_derived_from_each_models_kv_heads():
    cfg = validate_config({"models": [{"name": "llama3", "family": "llama3", "size": "tiny"},
                                      {"name": "opt", "family": "opt", "size": "tiny"},
                                      {"name": "big", "family": "opt", "hub": "facebook/opt-125m", "kv_heads": 12}],
                           "experiments": {"m": {"models": ["llama3", "opt"], "runs": [{"method": "mqa"}]}}})
    assert {r["run_id"]: r["budget"] for r in run_table(cfg)} == {
        "llama3__none__mqa__kv25__s0": 0.25, "opt__none__mqa__kv12.5__s0": 0.125}
    cfg["experiments"]["m"]["models"] = ["big"]
    assert [r["run_id"] for r in run_table(cfg)] == ["big__none__mqa__kv8.33__s0"]
    del cfg["models"][2]["kv_heads"]
    with pytest.raises(ConfigError, match="give that model entry kv_heads"):
        run_table(cfg)


@pytest.mark.parametrize(
    ("run", "why"),
    [
        ({"method": "mqa", "budgets": [0.25]}, r"model 'opt': MQA keeps 1 of the model's 8 K/V heads: its budget is 12.50%"),
        ({"method": "gqa", "budgets": [0.3]}, r"model 'opt': GQA cannot store 30.00% .*feasible budgets: 12.50%, 25.00%"),
        ({"method": "h2o+gqa", "budgets": [0.2], "params": {"inner_budget": 0.3}}, "GQA cannot store 30.00%"),
        ({"method": "mixsga", "params": {"ratios": [1, 1], "group_sizes": [1, 3]}}, r"group sizes \[3\] do not divide"),
    ],
)
def test_infeasible_budgets_are_rejected_before_any_job(run, why):
    with pytest.raises(ConfigError, match=r"experiments\.m\.runs\[0\]'.*" + why):
        validate_config({"models": [{"name": "opt", "family": "opt", "size": "tiny"}],
                         "experiments": {"m": {"runs": [run]}}})


def test_run_ids_and_budget_tags():
    assert budget_tag(1.0) == "kv100"
    assert budget_tag(0.5) == "kv50"
    assert budget_tag(0.375) == "kv37.5"
    assert budget_tag(0.35) == "kv35"
    assert make_run_id("opt-125m", "mixsga", 0.5, 3, training="cpt") == "opt-125m__cpt__mixsga__kv50__s3"
    assert make_run_id("o", "h2o+mixsga", 0.2, 0, params={"inner": {"ratios": [1, 1, 2]}}) == \
        "o__none__h2o+mixsga-innerr1.1.2__kv20__s0"


def test_grid_of_shipped_configs(tmp_path):
    offline = run_table(load_config([DEFAULT]))
    assert len(offline) == 111 and len({r["run_id"] for r in offline}) == 111
    main = [r for r in offline if "main" in r["experiments"]]
    assert len(main) == 4 * 19 and {r["seed"] for r in main} == {0}
    assert {r["family"] for r in offline} == {"llama3", "tinyllama", "opt", "gemma2"}
    skipped = set(load_config([DEFAULT])["default_skip"])
    assert len([r for r in offline if set(r["experiments"]) - skipped]) == 88  # what a bare `snakemake` runs
    full = load_config([DEFAULT, FULL])
    assert full["default_skip"] == [] and full["training"]["cpt"]["overrides"]["total_tokens"] == 131072
    full_rows = run_table(full)
    assert len(full_rows) == 278 and len([r for r in full_rows if "main" in r["experiments"]]) == 4 * 27 * 2
    test_rows = run_table(load_config([DEFAULT, TEST]))
    assert {e for r in test_rows for e in r["experiments"]} == set(load_config([DEFAULT])["experiments"])
    paper = run_table(load_config([DEFAULT, PAPER]))
    assert {r["source"] for r in paper} >= {"facebook/opt-125m", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"}
    out = write_run_table(offline, tmp_path / "runs.tsv")
    lines = out.read_text().splitlines()
    assert len(lines) == 112 and lines[0].startswith("run_id\texperiments\tmodel")


def test_run_spec_holds_what_determines_the_run():
    cfg = load_config([DEFAULT])
    spec = run_spec(cfg, "opt__cpt__base__kv100__s0")
    assert spec["model"] == {"name": "opt", "family": "opt", "size": "tiny", "pretrain": {"lr": 0.0005},
                             "cpt": {"lr": 0.0001}}
    assert spec["pretrain"] == {**cfg["pretrain"], "lr": 0.0005} and spec["tokenizer"] == cfg["tokenizer"]
    # only the eval keys a perplexity-only run reads (no instruct / zeroshot sections)
    assert spec["eval"] == {k: cfg["eval"][k] for k in ("text_set", "split", "seq_len", "batch_size", "max_tokens",
                                                         "longrange", "cache_chunk")}
    assert spec["seed"] == 0 and spec["budget"] == 1.0
    # the model's own CPT lr (models[].cpt) over the section's overrides; the rest of them as they are
    assert spec["training"]["kind"] == "cpt"
    assert spec["training"]["overrides"] == {**cfg["training"]["cpt"]["overrides"], "lr": 0.0001}
    assert cfg["training"]["cpt"]["overrides"]["lr"] == 0.0005
    assert run_spec(cfg, "llama3__cpt__gqa__kv50__s0")["training"]["overrides"]["lr"] == 0.0002
    bare = copy.deepcopy(cfg)
    del bare["models"][2]["cpt"]  # opt without its own: the section's lr
    assert run_spec(bare, "opt__cpt__base__kv100__s0")["training"]["overrides"]["lr"] == 0.0005
    for bad in ({"lr": 0}, {"lr": "fast"}, {"steps": 3}):
        broken = copy.deepcopy(cfg)
        broken["models"][2]["cpt"] = bad
        with pytest.raises(ConfigError, match="models"):
            validate_config(broken)
    assert spec["measure"] == cfg["measure"] and spec["evaluate"] == ["ppl"]
    # a hub model does not depend on the local pretraining recipe
    paper = load_config([DEFAULT, PAPER])
    hub = run_spec(paper, "opt-125m__cpt__base__kv100__s0")
    assert "pretrain" not in hub and "tokenizer" not in hub
    # adding a seed does not change an existing run's spec (so it is not rerun)
    more = load_config([DEFAULT], {"seeds": [0, 1, 2]})
    assert run_spec(more, "opt__cpt__base__kv100__s0") == spec


def test_run_spec_rejects_unknown_run_id():
    with pytest.raises(ConfigError, match="not in the grid"):
        run_spec(load_config([DEFAULT]), "opt__none__base__kv50__s0")


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


# ----------------------------------------------------------------------------- local datasets


def _paper_over(tmp_path, **extra):
    cfg = merge_config(merge_config(_file(DEFAULT), _file(PAPER)), extra)
    return cfg


def _minillm(path, rows=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(yaml.safe_dump({"instruction": f"q{i}", "input": "", "output": f"a{i}"},
                                           default_flow_style=True).replace("\n", " ") + "\n" for i in range(rows)))
    return path


def test_two_instruction_sets_on_one_file_are_refused(tmp_path):
    shared = _minillm(tmp_path / "minillm" / "valid.jsonl")
    cfg = _paper_over(tmp_path, datasets={"self_instruct": {"path": str(shared)},
                                          "vicuna": {"path": str(tmp_path / "minillm")}})
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "'vicuna' and 'self_instruct' both resolve to" in str(err.value) or \
        "'self_instruct' and 'vicuna' both resolve to" in str(err.value)
    # each set from its own file: accepted
    own = _minillm(tmp_path / "vicuna" / "valid.jsonl")
    cfg["datasets"]["vicuna"]["path"] = str(own.parent)
    validate_config(cfg)


def test_hub_layouts_of_sni_and_unnatural_differ_only_by_directory(tmp_path):
    sni, uni = _minillm(tmp_path / "sinst" / "11_" / "valid.jsonl"), _minillm(tmp_path / "uinst" / "11_" / "valid.jsonl")
    ok = _paper_over(tmp_path, datasets={"sni": {"path": str(tmp_path / "sinst")}, "unnatural": {"path": str(tmp_path / "uinst")}})
    validate_config(ok)
    bad = _paper_over(tmp_path, datasets={"sni": {"path": str(tmp_path / "sinst")}, "unnatural": {"path": str(sni)}})
    with pytest.raises(ConfigError, match="both resolve to"):
        validate_config(bad)
    assert uni.is_file()


def test_dolly_heldout_size_is_config_and_reaches_the_specs():
    cfg = load_config([DEFAULT, PAPER], overrides={"datasets": {"dolly": {"heldout": 20}}})
    sft = [s for s in train_table(cfg).values() if s["kind"] == "sft"]
    assert sft and all(s["dataset"] == {"path": None, "heldout": 20, "seed": 42} for s in sft)
    rouge = next(r for r in run_table(cfg) if "rouge" in r["evaluate"])
    assert run_spec(cfg, rouge["run_id"])["datasets"]["dolly"]["heldout"] == 20


def test_offline_mode_refuses_a_zero_shot_task_only_the_hub_has(tmp_path):
    from harness.orchestration.config import check_offline

    models = tmp_path / "m"
    models.mkdir()
    cfg = load_config([DEFAULT, PAPER])
    cfg["models"] = [{**m, "hub": str(models)} for m in cfg["models"]]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    repos = {t: f"org/{t}" for t in cfg["eval"]["zeroshot"]["tasks"]}
    with pytest.raises(ConfigError) as err:
        check_offline(cfg, environ=env, task_datasets=repos)
    assert "zero-shot task 'hellaswag'" in str(err.value) and "eval.zeroshot.paths.hellaswag" in str(err.value)
    assert "dataset 'dolly'" in str(err.value) and "model " not in str(err.value)
    # cached datasets and local task copies pass; online nothing is checked
    for repo in ["databricks/databricks-dolly-15k", "MiniLLM/self-inst", "MiniLLM/Vicuna", "MiniLLM/sinst",
                 "MiniLLM/uinst", "JeanKaddour/minipile", "Salesforce/wikitext", *list(repos.values())[1:]]:
        (tmp_path / "hf" / "datasets" / repo.replace("/", "___")).mkdir(parents=True)
    cfg["eval"]["zeroshot"]["paths"] = {"hellaswag": str(tmp_path)}
    check_offline(cfg, environ=env, task_datasets=repos)
    cfg["eval"]["zeroshot"]["paths"] = {}
    with pytest.raises(ConfigError, match="'hellaswag'"):
        check_offline(cfg, environ=env, task_datasets=repos)
    check_offline(cfg, environ={}, task_datasets=repos)


def test_a_run_spec_carries_only_the_eval_keys_it_reads():
    cfg = load_config([DEFAULT, PAPER])
    rows = run_table(cfg)
    changed = copy.deepcopy(cfg)
    changed["eval"]["zeroshot"]["tasks"] = ["piqa"]
    changed["eval"]["instruct"]["max_new_tokens"] = 7
    for row in rows:
        same = run_spec(cfg, row["run_id"], rows) == run_spec(changed, row["run_id"], rows)
        touched = {"zeroshot", "rouge"} & set(row["evaluate"])
        assert same == (not touched), row["run_id"]
    sft = next(r for r in rows if r["training"] == "sft" and "zeroshot" not in r["evaluate"])
    assert "zeroshot" not in run_spec(cfg, sft["run_id"], rows)["eval"]
    cpt_only = next(r for r in rows if r["evaluate"] == ["ppl"])
    spec = run_spec(cfg, cpt_only["run_id"], rows)
    assert "instruct" not in spec["eval"] and set(spec["datasets"]) == {"wikitext2"}
    # a training spec carries only its own kind's section
    trains = train_table(cfg, rows)
    assert all("max_rows" not in t for t in trains.values() if t["kind"] == "cpt")
