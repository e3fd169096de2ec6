"""The official qwen4_exp model (transformers) with its n-gram table served by engram-lm tiers
(hf/offload.py): the same logits and generated tokens as in memory, exports checked."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.qwen4_exp.modeling_qwen4_exp")

from engram_lm.hf.offload import TierEmbedding, offload_tables  # noqa: E402

EOS = 7


def tiny_qwen4(seed: int = 0, **kw):
    cfg = dict(vocab_size=97, hidden_size=16, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
               ple_layer_ids=[1], ple_embed_dim=24, ngram_size=3, heads_per_ngram=2, ngram_vocab_size_base=1000,
               eos_token_id=EOS, pad_token_id=0, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
               indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4)  # fmt: skip
    torch.manual_seed(seed)
    model = modeling.Qwen4ExpForCausalLM(modeling.Qwen4ExpTextConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # the random init leaves most rows near zero: make every row count
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding) and m.weight.shape[0] > 1000:
                m.weight.normal_()
    return model


def reference(model, new_tokens: int = 6, eos_at=((0, 7),)):
    """Ids with EOS inside (at `eos_at`), and the in-memory model's logits and greedy tokens for them."""
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    for b, t in eos_at:
        ids[b, t] = EOS
    with torch.no_grad():
        want = model(ids).logits
        tokens = model.generate(ids[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long),
                                max_new_tokens=new_tokens, do_sample=False)  # fmt: skip
    return ids, want, tokens


@pytest.mark.parametrize("tier, cache_rows", [("ram", 0), ("mmap", 0), ("ssd", 0), ("ssd", 64), ("mmap", 64), ("tiered", 0)])
def test_an_offloaded_table_gives_the_in_memory_logits_and_tokens(tmp_path, tier, cache_rows):
    model = tiny_qwen4()
    ids, want, tokens = reference(model)
    placements = offload_tables(model, tier=tier, dir=tmp_path / "tables", cache_rows=cache_rows)
    assert [p["module"] for p in placements] == ["model.layers.0.ple.ple_embedding"]
    assert isinstance(model.model.layers[0].ple.ple_embedding.ngram_embedding, TierEmbedding)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        again = model.generate(ids[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), max_new_tokens=6,
                               do_sample=False)  # fmt: skip
    assert torch.equal(again, tokens)


def test_an_export_is_reused_for_its_model_and_refused_for_another(tmp_path):
    offload_tables(tiny_qwen4(), tier="mmap", dir=tmp_path / "tables")
    before = (tmp_path / "tables" / "layer-0.bin").stat().st_mtime_ns
    model = tiny_qwen4()
    offload_tables(model, tier="mmap", dir=tmp_path / "tables")  # the same model: served from the files as they are
    assert (tmp_path / "tables" / "layer-0.bin").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="exported for another model or dtype"):
        offload_tables(tiny_qwen4(seed=0, heads_per_ngram=4, ple_embed_dim=24), tier="mmap", dir=tmp_path / "tables")
    data = bytearray((tmp_path / "tables" / "layer-0.bin").read_bytes())
    data[40] ^= 1
    (tmp_path / "tables" / "layer-0.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        offload_tables(tiny_qwen4(), tier="ssd", dir=tmp_path / "tables", verify=True)


def test_bad_requests_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="pass dir="):
        offload_tables(tiny_qwen4(), tier="mmap")
    with pytest.raises(ValueError, match="unknown tier"):
        offload_tables(tiny_qwen4(), tier="disk", dir=tmp_path)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="'gpt2' model has no table engram-lm can serve; supported: qwen4_exp .* gemma3n"):
        offload_tables(gpt2, tier="ram")


def test_tables_exported_from_a_sharded_checkpoint_are_the_models_and_are_served_as_they_are(tmp_path):
    from engram_lm.hf.checkpoint_tables import export_checkpoint_tables

    model = tiny_qwen4()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="50KB")  # many files; the table stored as 512 parts
    index = (tmp_path / "ckpt" / "model.safetensors.index.json").read_text()
    assert "ngram_embedding.shard_511.weight" in index and "ngram_embedding.weight" not in index
    manifest = export_checkpoint_tables(tmp_path / "ckpt", tmp_path / "from-ckpt")
    assert manifest["modules"] == ["model.layers.0.ple.ple_embedding"] and manifest["shapes"] == [[4096, 6]]
    offload_tables(tiny_qwen4(), tier="mmap", dir=tmp_path / "from-model")  # the same tables, from memory
    assert (tmp_path / "from-ckpt" / "layer-0.bin").read_bytes() == (tmp_path / "from-model" / "layer-0.bin").read_bytes()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = loaded(ids).logits
    stamp = (tmp_path / "from-ckpt" / "layer-0.bin").stat().st_mtime_ns
    offload_tables(loaded, tier="ssd", dir=tmp_path / "from-ckpt")  # reused, not rewritten
    assert (tmp_path / "from-ckpt" / "layer-0.bin").stat().st_mtime_ns == stamp
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_exporting_from_a_folder_without_tables_or_with_a_truncated_shard_names_the_problem(tmp_path):
    from engram_lm.hf.checkpoint_tables import export_checkpoint_tables

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="holds a 'gpt2' model; n-gram tables are exported from qwen4_exp"):
        export_checkpoint_tables(tmp_path / "gpt2", tmp_path / "out")
    tiny_qwen4().save_pretrained(tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated|cannot read"):
        export_checkpoint_tables(tmp_path / "ckpt", tmp_path / "out2")


def test_the_tables_export_command(tmp_path, capsys):
    from engram_lm.cli import main

    tiny_qwen4().save_pretrained(tmp_path / "ckpt")
    assert main(["tables", "export", "--model", str(tmp_path / "ckpt"), "--to", str(tmp_path / "t"), "--dtype", "fp32"]) == 0
    assert "1 table(s) [[4096, 6]] as fp32" in capsys.readouterr().out
    assert main(["tables", "export", "--model", str(tmp_path / "nothing"), "--to", str(tmp_path / "t2")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("tier", ["mmap", "ssd", "tiered"])
def test_prefetch_requests_each_forwards_rows_before_the_layer_and_changes_no_output(tmp_path, tier):
    model = tiny_qwen4()
    ids, want, tokens = reference(model, eos_at=((0, 7), (1, 2)))  # a document ends early in the second too
    offload_tables(model, tier=tier, dir=tmp_path / "tables", prefetch=True)
    emb = model.model.layers[0].ple.ple_embedding.ngram_embedding
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        again = model.generate(ids[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), max_new_tokens=6,
                               do_sample=False)  # fmt: skip
    assert torch.equal(again, tokens)
    stats = emb.stats()
    # one full forward, then the prompt and 5 cached decoding steps (the 6th token needs no forward): every one
    # prefetched, and each prefetch was the rows the official code asked for (the history read from the cache)
    assert stats["calls"] == 7 and stats["prefetch_hits"] == 7 and stats["prefetch_misses"] == 0
    assert emb.table.prefetched == 7  # the tier handed over the prefetched reads, none redone
    with torch.no_grad():  # embeddings instead of ids: nothing to hash ahead, the layer reads its rows itself
        model(inputs_embeds=model.get_input_embeddings()(ids))
    assert emb.stats()["calls"] == 8 and emb.stats()["prefetch_hits"] == 7


_PEAK_RSS = """
import sys
from engram_lm.hf.load import from_pretrained_offloaded
import transformers
if sys.argv[1] == "offloaded":
    model = from_pretrained_offloaded(sys.argv[2], tables_dir=sys.argv[3], tier="mmap")
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], local_files_only=True)
print([int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""  # VmHWM, the peak of this process alone: getrusage's maxrss keeps the parent's from before exec


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak resident memory from /proc (Linux)")
def test_a_checkpoint_loads_with_its_table_served_from_a_tier_never_in_memory(tmp_path):
    import subprocess
    import sys

    from engram_lm.hf.load import from_pretrained_offloaded

    model = tiny_qwen4(ngram_vocab_size_base=2_000_000, ple_embed_dim=96)  # 8,000,128 rows x 24: a 768 MB table
    model.save_pretrained(tmp_path / "ckpt")
    ids, want, tokens = reference(model, new_tokens=4)
    del model
    loaded = from_pretrained_offloaded(tmp_path / "ckpt", tables_dir=tmp_path / "tables", tier="ssd", prefetch=True).eval()
    assert isinstance(loaded.model.layers[0].ple.ple_embedding.ngram_embedding, TierEmbedding)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
        assert torch.equal(loaded.generate(ids[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long),
                                           max_new_tokens=4, do_sample=False), tokens)  # fmt: skip
    peak = {how: int(subprocess.run([sys.executable, "-c", _PEAK_RSS, how, str(tmp_path / "ckpt"), str(tmp_path / "tables")],
                                    capture_output=True, text=True, check=True).stdout.split()[-1])
            for how in ("offloaded", "whole")}  # fmt: skip
    assert peak["whole"] - peak["offloaded"] > 700e6  # the 768 MB table never came into the offloaded process
    other = tiny_qwen4(ngram_vocab_size_base=1000)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="another model"):
        from_pretrained_offloaded(tmp_path / "other", tables_dir=tmp_path / "tables")


def tiny_gemma3n(seed: int = 0):
    from transformers.models.gemma3n import modeling_gemma3n as gemma

    cfg = gemma.Gemma3nTextConfig(vocab_size=160, vocab_size_per_layer_input=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=4,
                                  altup_num_inputs=2, sliding_window=16, max_position_embeddings=64,
                                  layer_types=["sliding_attention", "full_attention"],
                                  activation_sparsity_pattern=[0.0, 0.0])  # fmt: skip
    torch.manual_seed(seed)
    model = gemma.Gemma3nForCausalLM(cfg).eval()
    with torch.no_grad():  # make every per-layer row count
        model.model.embed_tokens_per_layer.weight.normal_()
    return model


@pytest.mark.parametrize("tier, prefetch", [("ram", False), ("ssd", False), ("tiered", True)])
def test_gemma_per_layer_embeddings_are_served_by_a_tier_with_the_same_logits(tmp_path, tier, prefetch):
    model = tiny_gemma3n()
    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(3))  # ids >= 128 read row 0, as official
    with torch.no_grad():
        want = model(ids).logits
        tokens = model.generate(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=5,
                                do_sample=False)  # fmt: skip
    placements = offload_tables(model, tier=tier, dir=tmp_path / "tables", prefetch=prefetch)
    assert [p["module"] for p in placements] == ["model.embed_tokens_per_layer"] and placements[0]["rows"] == 128
    emb = model.model.embed_tokens_per_layer
    assert isinstance(emb, TierEmbedding) and emb.embed_scale is not None  # the official scale, kept
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model.generate(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long),
                                          max_new_tokens=5, do_sample=False), tokens)  # fmt: skip
    if prefetch:
        assert emb.stats()["prefetch_hits"] == emb.stats()["calls"] > 1  # every forward's rows were requested ahead


def test_loading_offloaded_reports_no_skipped_table_as_unexpected(tmp_path, capfd, caplog):
    """transformers' load report flagged the table tensors the tier serves as UNEXPECTED ("not ok if you
    expect identical arch") although the model is exact; the family's class attribute is restored after."""
    from engram_lm.hf.load import from_pretrained_offloaded

    model = tiny_qwen4()
    model.save_pretrained(tmp_path / "ckpt")
    ids, want, _ = reference(model, new_tokens=1)
    official = modeling.Qwen4ExpPreTrainedModel.__dict__.get("_keys_to_ignore_on_load_unexpected", "absent")
    capfd.readouterr()
    loaded = from_pretrained_offloaded(tmp_path / "ckpt", tables_dir=tmp_path / "tables", tier="mmap").eval()
    said = "".join(capfd.readouterr()) + caplog.text  # transformers reports through its logger
    assert "UNEXPECTED" not in said and "LOAD REPORT" not in said
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    assert modeling.Qwen4ExpPreTrainedModel.__dict__.get("_keys_to_ignore_on_load_unexpected", "absent") == official


def _fine_tuned(model):
    """The model with one table row changed, as a sparse fine-tune leaves it."""
    with torch.no_grad():
        model.model.layers[0].ple.ple_embedding.ngram_embedding.weight[5] += 0.5
    return model


def test_an_export_serves_only_the_tables_it_was_made_from(tmp_path):
    """A second model of the same configuration, or this model after its table was fine-tuned, pointed
    at the export: refused in one line naming both sources and the fix (it served the first table:
    logits off by 0.2)."""
    offload_tables(tiny_qwen4(), tier="mmap", dir=tmp_path / "tables")
    manifest = (tmp_path / "tables" / "manifest.json").read_text()
    for other in (tiny_qwen4(seed=1), _fine_tuned(tiny_qwen4())):
        with pytest.raises(ValueError, match=r"were exported from .* sha256 [0-9a-f]{12}.*this model's .* sha256 "
                                             r"[0-9a-f]{12}.*remove .*tables.* or pass another dir"):
            offload_tables(other, tier="mmap", dir=tmp_path / "tables")
    assert (tmp_path / "tables" / "manifest.json").read_text() == manifest  # nothing rebuilt behind the user's back
    model = tiny_qwen4()  # the same weights, loaded again: served from the export as it is
    ids, want, _ = reference(tiny_qwen4(), new_tokens=1)
    offload_tables(model, tier="mmap", dir=tmp_path / "tables")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_an_export_without_a_recorded_source_is_refused_not_trusted(tmp_path):
    import json

    offload_tables(tiny_qwen4(), tier="mmap", dir=tmp_path / "tables")
    path = tmp_path / "tables" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["source"]  # as an export written before sources were recorded
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="records no source"):
        offload_tables(tiny_qwen4(), tier="mmap", dir=tmp_path / "tables")


def test_a_checkpoints_export_serves_only_that_checkpoints_tables(tmp_path):
    from engram_lm.hf.load import from_pretrained_offloaded

    tiny_qwen4().save_pretrained(tmp_path / "a")
    tiny_qwen4(seed=1).save_pretrained(tmp_path / "b")  # the same configuration, other weights
    from_pretrained_offloaded(tmp_path / "a", tables_dir=tmp_path / "tables", tier="mmap")
    with pytest.raises(ValueError, match=r"were exported from .*a.* sha256 .*b.* sha256.*remove"):
        from_pretrained_offloaded(tmp_path / "b", tables_dir=tmp_path / "tables", tier="mmap")
    from_pretrained_offloaded(tmp_path / "a", tables_dir=tmp_path / "tables", tier="mmap")  # unchanged: reused
    _fine_tuned(tiny_qwen4()).save_pretrained(tmp_path / "a")  # fine-tuned and saved over the exported checkpoint
    with pytest.raises(ValueError, match=r"were exported from .*a.* sha256 .*now .* sha256.*remove"):
        from_pretrained_offloaded(tmp_path / "a", tables_dir=tmp_path / "tables", tier="mmap")


def test_the_model_cast_after_offloading_gets_its_rows_in_its_new_dtype(tmp_path):
    model = tiny_qwen4()
    ids, _, _ = reference(model, new_tokens=1)
    offload_tables(model, tier="ram")
    model.to(torch.bfloat16)  # failed in a matmul: the tier's rows stayed fp32
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_offloading_twice_or_from_a_foreign_folder_is_one_line_naming_the_fix(tmp_path):
    import json

    model = tiny_qwen4()
    offload_tables(model, tier="ram")
    with pytest.raises(ValueError, match="already served from a tier .* load the model again"):
        offload_tables(model, tier="mmap", dir=tmp_path / "t")  # was: IndexError: tuple index out of range
    foreign = tmp_path / "engram-export"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "engram-lm-memory/1", "fingerprint": "abc", "dtype": "bf16",
                                                       "head_dim": 8, "layers": {}}))  # what export-memory writes
    with pytest.raises(ValueError, match="engram export-memory. export .* give another dir"):
        offload_tables(tiny_qwen4(), tier="mmap", dir=foreign)  # was: KeyError: 'shapes'


def test_from_pretrained_offloaded_refuses_another_familys_export_and_takes_dtype_as_transformers_does(tmp_path):
    from engram_lm.hf.load import from_pretrained_offloaded

    tiny_qwen4().save_pretrained(tmp_path / "ckpt")
    offload_tables(tiny_gemma3n(), tier="mmap", dir=tmp_path / "gemma-tables")
    with pytest.raises(ValueError, match="not a qwen4_exp PLE table: give another tables_dir"):
        from_pretrained_offloaded(tmp_path / "ckpt", tables_dir=tmp_path / "gemma-tables")  # was: 'NoneType' ... 'group'
    with pytest.raises(ValueError, match="table_dtype='bf16'"):
        from_pretrained_offloaded(tmp_path / "ckpt", tables_dir=tmp_path / "tables", dtype="bf16")
    model = from_pretrained_offloaded(tmp_path / "ckpt", tables_dir=tmp_path / "tables", tier="mmap", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # was fp32: dtype= taken as the rows' encoding
    assert model.model.layers[0].ple.ple_embedding.ngram_embedding.dtype == torch.bfloat16


def test_a_damaged_tables_export_names_the_command_that_rewrites_it(tmp_path):
    from engram_lm.hf.checkpoint_tables import export_checkpoint_tables
    from engram_lm.memory.export import verify_memory

    tiny_qwen4().save_pretrained(tmp_path / "ckpt")
    export_checkpoint_tables(tmp_path / "ckpt", tmp_path / "tables")
    data = bytearray((tmp_path / "tables" / "layer-0.bin").read_bytes())
    data[40] ^= 1
    (tmp_path / "tables" / "layer-0.bin").write_bytes(bytes(data))
    report = verify_memory(tmp_path / "tables")
    assert "engram tables export --model" in report["layers"]["0"] and "export-memory" not in report["layers"]["0"]
