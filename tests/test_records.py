"""Record schema, validation messages, atomic writes and resume lookup."""

from __future__ import annotations

import json
import os

import pytest

from harness import atomic
from harness.orchestration.records import existing_record, read_record, validate_record, write_json_atomic, write_record


def test_factory_record_is_valid_and_has_every_section(make_record):
    rec = make_record()
    validate_record(rec)
    assert set(rec) == {
        "schema_version", "identity", "provenance", "budget", "quality", "performance", "flags", "wall_time_s",
    }
    assert rec["identity"]["config"]["run_id"] == rec["identity"]["run_id"] == "llama3__none__base__kv100__s0"
    assert rec["identity"]["experiments"] == ["main"] and rec["identity"]["training"] == "none"
    assert rec["identity"]["training_summary"] is None
    # unmeasured numbers are null, not invented
    assert rec["quality"]["rouge_l"] is None and rec["performance"]["prefill_ms"] is None
    assert rec["quality"]["zeroshot"] is None and rec["performance"]["by_context"] == []
    assert rec["performance"]["peak_memory_bytes"] == {"prefill": None, "decode": None}
    # the method's structured fields come from its spec (analysis reads them instead of the name)
    assert rec["identity"]["method_fields"] == {"architecture": "base", "eviction": None, "keep": None,
                                                "variant": None, "architecture_params": {}}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.pop("provenance"), "'provenance' is a required property"),
        (lambda r: r["provenance"]["git"].pop("commit"), "record field 'provenance.git'"),
        (lambda r: r["quality"].update(ppl_token="low"), "record field 'quality.ppl_token'"),
        (lambda r: r["quality"].update(ppl_token=-1.0), "record field 'quality.ppl_token'"),
        (lambda r: r["budget"].update(nominal=0.0), "record field 'budget.nominal'"),
        (lambda r: r["flags"].update(simulated=None), "record field 'flags.simulated'"),
        (lambda r: r["quality"].update(bleu=3.0), "'bleu' was unexpected"),
        (lambda r: r["quality"].update(ppl_word=float("nan")), "record field 'quality.ppl_word': not a finite"),
        (lambda r: r["provenance"].update(seed=7), "record field 'provenance.seed': differs"),
        (lambda r: r.update(schema_version=0), "record field 'schema_version'"),
        (lambda r: r["performance"].update(decode_tokens_per_s={"mean": 1.0}), "performance.decode_tokens_per_s"),
        (lambda r: r["identity"].update(training="lora"), "record field 'identity.training'"),
        (lambda r: r["identity"].update(experiments=[]), "record field 'identity.experiments'"),
        (lambda r: r["quality"].update(zeroshot={"piqa": "high"}), "record field 'quality.zeroshot.piqa'"),
        (lambda r: r["quality"].update(gen_len=3.0), "'gen_len' was unexpected"),
        (lambda r: r["budget"].update(decode_expert_fractions=[1.5]), "budget.decode_expert_fractions[0]"),
        (lambda r: r["identity"].update(training_summary={"steps": 3}), "identity.training_summary"),
        (lambda r: r["identity"].pop("method_fields"), "'method_fields' is a required property"),
        (lambda r: r["identity"]["method_fields"].update(keep=1.5), "identity.method_fields.keep"),
        (lambda r: r["quality"].update(ppl_windows={"nll": [1.0, 2.0], "tokens": [3]}),
         "quality.ppl_windows': 2 NLL sums but 1 token counts"),
        (lambda r: r["quality"].update(eval_tokens=7, ppl_windows={"nll": [1.0], "tokens": [3]}),
         "quality.ppl_windows': its tokens sum to 3, not eval_tokens 7"),
        (lambda r: r["quality"].update(ppl_windows={"nll": [-1.0], "tokens": [3]}), "quality.ppl_windows"),
    ],
)
def test_invalid_records_are_rejected_naming_the_field(make_record, mutate, field):
    rec = make_record()
    mutate(rec)
    with pytest.raises(ValueError) as err:
        validate_record(rec)
    assert field in str(err.value)


def test_full_performance_section_validates(make_record):
    rec = make_record()
    summary = {"mean": 100.0, "p50": 101.0, "p90": 110.0, "std": 3.0, "min": 95.0, "n": 5}
    timing = {"context_len": 128, "new_tokens": 16, "prefill_ms": summary, "decode_tokens_per_s": summary,
              "peak_memory_bytes": {"prefill": 1e6, "decode": 2e6},
              "peak_torch_allocated_bytes": {"prefill": None, "decode": None}, "memory_source": "rss"}
    rec["performance"] = {
        "device": "cpu",
        "context_len": 128,
        "prefill_ms": summary,
        "decode_tokens_per_s": summary,
        "peak_memory_bytes": {"prefill": 1e6, "decode": 2e6},
        "by_context": [timing],
    }
    rec["identity"]["training"] = "cpt"
    rec["identity"]["training_summary"] = {
        "train_id": "llama3__cpt__base__kv100__s0", "recipe": "cpt_offline", "steps": 16, "tokens": 8192,
        "target_tokens": 8192, "token_hash": "ab" * 32, "final_loss": 4.0, "final_loss_avg": 4.1,
        "aux_loss_final": None, "agreement_final": None, "precision": "fp32", "wall_time_s": 3.0,
    }
    rec["quality"].update(zeroshot={"heldout_mc": 0.5}, rouge_l=12.0, gen_length=9.5,
                          rouge_by_set={"offline": {"rouge_l": 12.0, "gen_length": 9.5, "rows": 32}})
    rec["budget"].update(decode_expert_fractions=[0.3, 0.1, 0.6], prefill_expert_fractions=[0.3, 0.1, 0.6])
    validate_record(rec)


def test_write_then_read_round_trips(tmp_path, make_record):
    rec = make_record()
    path = write_record(tmp_path / "records" / "r.json", rec)
    assert read_record(path) == rec
    assert path.read_text().endswith("\n")
    assert sorted(os.listdir(path.parent)) == ["r.json"], "no temp files may remain"


def test_invalid_record_is_not_written(tmp_path, make_record):
    path = tmp_path / "r.json"
    rec = make_record()
    rec["quality"]["ppl_token"] = "bad"
    with pytest.raises(ValueError):
        write_record(path, rec)
    assert not path.exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, make_record, monkeypatch):
    path = write_record(tmp_path / "r.json", make_record(ppl_token=10.0))
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", crash)  # the writer records use
    with pytest.raises(OSError, match="disk gone"):
        write_record(path, make_record(ppl_token=20.0))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["r.json"]


def test_json_writer_rejects_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"x": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_read_record_names_the_file(tmp_path, make_record):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_record(broken)
    rec = make_record()
    del rec["flags"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="bad.json: invalid record"):
        read_record(bad)


def test_existing_record_requires_same_spec(tmp_path, make_record):
    rec = make_record()
    spec = rec["identity"]["config"]
    path = tmp_path / "r.json"
    assert existing_record(path, spec) is None
    write_record(path, rec)
    assert existing_record(path, spec) == rec
    other = dict(spec, eval=dict(spec["eval"], seq_len=spec["eval"]["seq_len"] * 2))
    assert existing_record(path, other) is None
    path.write_text("{}")
    assert existing_record(path, spec) is None


def test_atomic_writer_writes_text_and_bytes_readable_by_others(tmp_path):
    from harness.atomic import write_atomic

    text = write_atomic(tmp_path / "sub" / "t.md", "ünïcode\n")
    assert text.read_bytes() == "ünïcode\n".encode("utf-8")
    raw = write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert raw.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert raw.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's private 0o600
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "sub"]
