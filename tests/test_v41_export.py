"""DeepSeek-V4.1 Engram tables from a checkpoint folder (hf/v41.py), on synthetic shards with the
real tensor names, dtypes and row width (256 fp8 values and 8 ue8m0 scales a row)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from engram_lm.hf.checkpoint_tables import export_checkpoint_tables
from engram_lm.memory.host import MmapTable
from engram_lm.memory.ssd import SsdTable

ROWS = {1: 1000, 14: 1003}


def _checkpoint(folder, rows=ROWS, config_rows=None):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer, n in rows.items():
        tensors[f"layers.{layer}.engram.embed.weight"] = (torch.randn(n, 256, generator=g) * 40).to(torch.float8_e4m3fn)
        tensors[f"layers.{layer}.engram.embed.scale"] = torch.randint(110, 140, (n, 8), generator=g, dtype=torch.uint8).view(
            torch.float8_e8m0fnu)
    tensors["layers.0.attn.wq_a.weight"] = torch.randn(8, 8).to(torch.bfloat16)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():  # the weight and scale of a layer may sit in different shards
        save_file({k: tensors[k].contiguous() for k in part}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in shards.items() for k in part}}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v41", "engram_layer_ids": list(rows), "engram_head_dim": 256,
        "engram_num_embeddings": config_rows or list(rows.values())}))
    return tensors


def test_v41_tables_export_as_their_own_bytes_and_decode_to_weight_times_scale(tmp_path):
    tensors = _checkpoint(tmp_path / "ckpt")
    manifest = export_checkpoint_tables(tmp_path / "ckpt", tmp_path / "tables", dtype="fp32")  # dtype: V4.1's own fp8
    assert manifest["dtype"] == "fp8" and manifest["shapes"] == [[1000, 256], [1003, 256]]
    assert manifest["modules"] == ["layers.1.engram.embed", "layers.14.engram.embed"]
    for k, layer in enumerate(ROWS):
        w, s = tensors[f"layers.{layer}.engram.embed.weight"], tensors[f"layers.{layer}.engram.embed.scale"]
        raw = (tmp_path / "tables" / f"layer-{k}.bin").read_bytes()
        assert len(raw) == ROWS[layer] * 264
        assert raw[:256] == w[0].view(torch.uint8).numpy().tobytes() and raw[256:264] == s[0].view(torch.uint8).numpy().tobytes()
        want = w.float() * torch.pow(2.0, s.view(torch.uint8).float() - 127).repeat_interleave(32, 1)  # the V4.1 format
        rows = torch.tensor([0, 7, ROWS[layer] - 1])
        for table in (MmapTable(tmp_path / "tables" / f"layer-{k}.bin", ROWS[layer], 256, "fp8"),
                      SsdTable(tmp_path / "tables" / f"layer-{k}.bin", ROWS[layer], 256, "fp8")):
            assert torch.equal(table(rows), want[rows])


def test_v41_checkpoints_that_disagree_with_their_config_or_are_damaged_are_refused(tmp_path):
    _checkpoint(tmp_path / "a", config_rows=[1000, 1004])
    with pytest.raises(ValueError, match="layer 14's Engram table is 1,003 x 256 .* config.json says 1,004 rows"):
        export_checkpoint_tables(tmp_path / "a", tmp_path / "out-a")
    _checkpoint(tmp_path / "b")
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    del index["weight_map"]["layers.14.engram.embed.scale"]
    (tmp_path / "b" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="layer 14's Engram table lacks its scale tensor"):
        export_checkpoint_tables(tmp_path / "b", tmp_path / "out-b")
    _checkpoint(tmp_path / "c")
    shard = tmp_path / "c" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or damaged: download it again"):
        export_checkpoint_tables(tmp_path / "c", tmp_path / "out-c")


@pytest.mark.parametrize("key, value", [("engram_num_embeddings", 1000), ("engram_layer_ids", 1),
                                        ("engram_head_dim", [256]), ("engram_layer_ids", [1, 14, 20])])
def test_a_v41_config_value_of_the_wrong_shape_is_named_not_a_traceback(tmp_path, key, value, capsys):
    from engram_lm.cli import main

    _checkpoint(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, key: value}))
    assert main(["tables", "export", "--model", str(tmp_path / "ckpt"), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert key in err and "config.json" in err and len(err.strip().splitlines()) == 1


def test_a_v41_export_records_its_source(tmp_path):
    _checkpoint(tmp_path / "ckpt")
    manifest = export_checkpoint_tables(tmp_path / "ckpt", tmp_path / "tables")
    source = manifest["source"]
    assert source["from"] == str((tmp_path / "ckpt").resolve()) and len(source["tables_sha256"]) == 2
    assert source["tables_sha256"] == [manifest["layers"][k]["sha256"] for k in ("0", "1")]  # rows copied as stored
    assert sorted(source["files"]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
