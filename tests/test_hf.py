"""Engram retrofitted into Hugging Face causal LMs (needs the [hf] extra; offline, random weights)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram_lm.cli import main  # noqa: E402
from engram_lm.hf import add_engram  # noqa: E402
from engram_lm.hf.adapter import load_engram, save_engram  # noqa: E402

V = 96


def tiny_config(family: str, layers: int = 3):
    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]  # fmt: skip
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, head_dim=8, **common)  # fmt: skip


def tiny_model(family: str, seed: int = 0, layers: int = 3):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, layers)).eval()


def perturb(retrofit):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in retrofit.parameters():
            p.add_(0.1 * torch.randn_like(p))


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_retrofit_leaves_outputs_exactly_unchanged(family):
    model = tiny_model(family)
    ids = torch.randint(2, V, (2, 12))
    before = model(ids).logits
    retrofit = add_engram(model, f"identity:{V}", layers=(1,), table_size=101, num_heads=2)
    assert torch.equal(model(ids).logits, before)
    perturb(retrofit)
    assert not torch.equal(model(ids).logits, before)  # and the memory is really wired in


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_with_kv_cache_equals_full_recompute(family):
    model = tiny_model(family)
    perturb(add_engram(model, f"identity:{V}", layers=(0, 2), table_size=101, num_heads=2))
    prompt = torch.randint(2, V, (2, 6))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0, eos_token_id=None)  # fmt: skip
    full = model(out).logits.argmax(-1)  # no cache: every position recomputed from scratch
    assert torch.equal(full[:, prompt.shape[1] - 1 : -1], out[:, prompt.shape[1] :])


def test_adapter_round_trip_is_bit_exact_and_refuses_another_base_or_tokenizer(tmp_path, word_tokenizer_file):
    tok = word_tokenizer_file([f"w{i}" for i in range(V)])
    model = tiny_model("llama")
    perturb(add_engram(model, tok, layers=(1,), table_size=101, num_heads=2))
    ids = torch.randint(2, V, (1, 10))
    want = model(ids).logits
    save_engram(model, tmp_path / "adapter")
    fresh = tiny_model("llama")
    load_engram(fresh, tmp_path / "adapter", tokenizer=tok)
    assert torch.equal(fresh(ids).logits, want)
    for a, b in zip(model.engram.state_dict().values(), fresh.engram.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="was trained on base"):
        load_engram(tiny_model("llama", layers=4), tmp_path / "adapter")
    other = word_tokenizer_file([f"x{i}" for i in range(V)], name="other.json")
    with pytest.raises(ValueError, match="another tokenizer"):
        load_engram(tiny_model("llama"), tmp_path / "adapter", tokenizer=other)
    for tier in ("ram", "mmap"):  # the tables can live off the compute device
        served = tiny_model("llama")
        load_engram(served, tmp_path / "adapter", memory=tier)
        assert torch.equal(served(ids).logits, want)


def test_unsupported_family_and_bad_layers_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        add_engram(model, f"identity:{V}", layers=(7,))
    model.config.model_type = "bert"
    with pytest.raises(ValueError, match="not supported yet"):
        add_engram(model, f"identity:{V}")


def test_retrofit_command_trains_only_the_memory_and_beats_the_frozen_base(tmp_path, capsys, hf_base):
    base, docs = hf_base
    argv = ["retrofit", "--model", str(base), "--data", str(docs), "--steps", "40", "--out", str(tmp_path / "run"),
            "--set", "batch_size=8", "--set", "seq_len=32", "--set", "eval_batches=2", "--set", "table_size=997",
            "--set", "lr=0.003", "--quiet", "--json"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["val_loss"] < r["base_val_loss"]
    assert 0 < r["trainable_params"] < r["total_params"]
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()
    assert main(argv) == 0  # finished: rerunning resumes at the end and changes nothing
    assert json.loads(capsys.readouterr().out)["val_loss"] == pytest.approx(r["val_loss"], abs=1e-6)


def test_a_manual_prefill_without_a_cache_object_still_decodes_exactly(word_tokenizer_file):
    # use_cache=True and no past_key_values: the model makes the cache itself; Engram's conv must still stream
    model = tiny_model("llama")
    perturb(add_engram(model, f"identity:{V}", layers=(1,), table_size=101, num_heads=2))
    ids = torch.randint(2, V, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        past, steps = out.past_key_values, []
        for t in range(6, 9):
            out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, 6:9], atol=1e-5), (torch.stack(steps, 1) - full[:, 6:9]).abs().max()


def test_engram_on_a_peft_lora_model_trains_lora_and_memory_with_their_own_optimizers(tmp_path):
    peft = pytest.importorskip("peft")
    from engram_lm.hf.train import engram_optimizers

    base = tiny_model("llama")
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    retrofit = add_engram(model, f"identity:{V}", layers=(1,), table_size=101, num_heads=2)
    perturb(retrofit)  # the memory active from the start (its value projection starts at zero)
    opts = engram_optimizers(model, lr=1e-2)
    assert set(opts) == {"table", "engram", "other"}
    assert all("lora_" in n for n, p in model.named_parameters() if any(p is q for q in opts["other"].param_groups[0]["params"]))
    ids = torch.randint(2, V, (2, 12))
    before = model(ids).logits.detach()
    tables = [e.memory.weight.detach().clone() for e in retrofit.engrams.values()]
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert not torch.equal(model(ids).logits, before)
    assert all(not torch.equal(t, e.memory.weight) for t, e in zip(tables, retrofit.engrams.values()))  # rows read moved
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA trained (B starts at zero)
    checked = 0
    for n, p in base.named_parameters():  # the base weights themselves never move (LoRA wraps q/v: base_layer)
        if n.replace(".base_layer", "") in frozen:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n
            checked += 1
    assert checked == len(frozen)
    save_engram(model, tmp_path / "adapter")  # the memory saves from the peft model like from the base
    fresh = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    load_engram(fresh, tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(retrofit.state_dict().values(), fresh.engram.state_dict().values()))
