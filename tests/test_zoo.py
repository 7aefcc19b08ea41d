"""Model zoo: each family keeps its architecture; loading local checkpoints with clear errors."""

import shutil

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hfconvert.softcap_attention import ATTN_NAME as SOFTCAP_FUSED
from harness.data.corpus import build_corpus, stdlib_dir
from harness.data.tokenizer import train_tokenizer
from harness.models.zoo import FAMILIES, build_config, count_parameters, family_of, load_base_model

TRAIN_SEQ = 256  # the offline pretraining sequence length


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    (root / "src").mkdir()
    for name in ("colorsys", "bisect", "heapq", "shlex", "string", "copy"):
        shutil.copy(stdlib_dir() / f"{name}.py", root / "src" / f"{name}.py")
    build_corpus(root / "corpus", source_dir=root / "src", val_fraction=0.25, test_fraction=0.2)
    return train_tokenizer(root / "corpus", root / "tok", vocab_size=300)


def test_families_and_paper_checkpoints():
    assert set(FAMILIES) == {"llama3", "tinyllama", "opt", "gemma2"}
    ckpts = {c for spec in FAMILIES.values() for c in spec.checkpoints}
    assert {"facebook/opt-125m", "facebook/opt-350m", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B",
            "meta-llama/Llama-3.1-8B", "google/gemma-2-2b",
            "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"} <= ckpts


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_kv_heads_allow_group_sizes_1_2_4(tok, family, size):
    cfg = build_config(family, size, tok)
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert kv >= 4 and kv % 4 == 0 or (family == "opt" and size == "small" and kv == 12)
    assert cfg.vocab_size == len(tok) and cfg.bos_token_id == tok.bos_token_id
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id


def test_family_architectures(tok):
    llama = build_config("llama3", "tiny", tok)
    assert llama.num_attention_heads // llama.num_key_value_heads == 4
    assert llama.rope_parameters["rope_theta"] == 500000.0 and llama.tie_word_embeddings

    tiny = build_config("tinyllama", "tiny", tok)
    assert tiny.model_type == "llama" and tiny.num_attention_heads // tiny.num_key_value_heads == 8
    assert not tiny.tie_word_embeddings and family_of(tiny) == "tinyllama" and family_of(llama) == "llama3"

    opt = build_config("opt", "tiny", tok)
    assert opt.enable_bias and opt.do_layer_norm_before and opt.max_position_embeddings >= TRAIN_SEQ
    model = AutoModelForCausalLM.from_config(opt)
    assert model.model.decoder.layers[0].self_attn.k_proj.bias is not None
    assert model.model.decoder.embed_positions.weight.shape[0] == opt.max_position_embeddings + 2  # learned

    gemma = build_config("gemma2", "tiny", tok)
    assert gemma.head_dim != gemma.hidden_size // gemma.num_attention_heads
    assert gemma.attn_logit_softcapping and gemma.final_logit_softcapping
    assert gemma.query_pre_attn_scalar == gemma.head_dim
    assert gemma.sliding_window < TRAIN_SEQ
    assert gemma.layer_types == ["sliding_attention", "full_attention"] * (gemma.num_hidden_layers // 2)
    assert gemma._attn_implementation == SOFTCAP_FUSED  # eager (the only path that soft-caps), fused


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_models_are_a_few_million_parameters_and_run(tok, family):
    model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tok))
    # With the real 4096-token vocabulary these are 3-6 M parameters; here the vocab is 300.
    assert 1_000_000 < count_parameters(model) < 8_000_000
    ids = torch.randint(3, len(tok), (2, 80))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 80, len(tok)) and torch.isfinite(out.loss)


def test_gemma2_sliding_window_changes_outputs(tok):
    torch.manual_seed(0)
    cfg = build_config("gemma2", "tiny", tok, num_hidden_layers=2, sliding_window=8)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, len(tok), (1, 40))
    with torch.no_grad():
        windowed = model(input_ids=ids).logits
        model.config.sliding_window = 4096  # every layer global
        for layer in model.model.layers:
            layer.self_attn.sliding_window = None
        full = model(input_ids=ids).logits
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5)  # inside the window: identical
    assert not torch.allclose(windowed[:, 20:], full[:, 20:], atol=1e-4)  # beyond it: local layers differ


def test_unknown_family_and_size(tok):
    with pytest.raises(ValueError, match="known families"):
        build_config("gpt2", "tiny", tok)
    with pytest.raises(ValueError, match="known sizes"):
        build_config("opt", "huge", tok)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_base_model_from_local_hub_format_dir(tok, family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tok, num_hidden_layers=2))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_base_model(tmp_path, dtype="float32", device="cpu")
    assert not loaded.training and len(loaded_tok) == len(tok)
    ids = torch.randint(3, len(tok), (1, 16))
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)
    if family == "gemma2":
        assert loaded.config._attn_implementation == SOFTCAP_FUSED  # the suite reloads the fast kernel
    bf16, _ = load_base_model(str(tmp_path), dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_load_base_model_errors(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_base_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model hub"):
        load_base_model("facebook/opt-125m")  # offline and not cached
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        load_base_model(gpt2)
    broken = tmp_path / "broken"
    AutoModelForCausalLM.from_config(build_config("llama3", "tiny", tok, num_hidden_layers=1)).save_pretrained(broken)
    tok.save_pretrained(broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        load_base_model(broken)
    with pytest.raises(ValueError, match="dtype"):
        load_base_model(broken, dtype="float13")
