import json
import shutil
from pathlib import Path

import pytest
import torch

from engram_lm.config import EngramConfig
from engram_lm.models.config import ModelConfig
from engram_lm.models.transformer import EngramLM
from engram_lm.recipes import get_recipe
from engram_lm.checkpoint import store as ckpt_io
from engram_lm.models.overencoding import OverEncodingConfig
from engram_lm.training.data import eval_windows, is_val_document, prepare_data, sample_batch
from engram_lm.inference.loading import load_trained
from engram_lm.training.loop import train
from engram_lm.training.optim import (
    ROLES, OptimConfig, SparseRowAdam, build_optimizers, lr_multiplier, param_roles,
)  # fmt: skip


def small_model(**kw):
    engram = EngramConfig(tokenizer="identity:128", table_sizes=(101, 103), max_ngram=3, num_heads=2,
                          layer_ids=(1,), pad_id=0, embed_per_ngram=8)  # fmt: skip
    base = dict(vocab_size=128, dim=16, num_layers=2, num_heads=2, max_seq_len=32, ffn_hidden=32,
                num_routed_experts=3, top_k=1, expert_hidden=8, num_shared_experts=1, engram=engram,
                num_branches=2, overencoding=OverEncodingConfig(slots=53, table_dim=4))  # fmt: skip
    return EngramLM(ModelConfig(**{**base, **kw}))


def test_every_parameter_gets_exactly_one_optimizer():
    model = small_model()
    roles = param_roles(model)
    assert set(roles) == {n for n, _ in model.named_parameters()} and set(roles.values()) <= set(ROLES)
    assert roles["blocks.1.engram.memory.weight"] == "table"
    assert roles["overencoding.memory.weight"] == "table"
    assert roles["blocks.0.attn.wqkv.weight"] == "matrix"
    assert roles["embed.weight"] == "decay" and roles["blocks.1.ffn.router.weight"] == "decay"
    assert roles["blocks.1.attn_hc.phi.weight"] == "no_decay"
    # the gate's and the conv's RMSNorm weights are per-branch vectors stacked (M, D), not matrices: no Muon
    engram = {n.split("engram.")[1]: r for n, r in roles.items() if ".engram." in n}
    assert engram == {"memory.weight": "table", "key_value.weight": "matrix", "key_value.bias": "no_decay",
                      "gate.query_weight": "no_decay", "gate.key_weight": "no_decay",
                      "short_conv.norm_weight": "no_decay", "short_conv.weight": "no_decay"}  # fmt: skip
    optimizers = build_optimizers(model, OptimConfig(lr=1e-3))
    seen = [id(p) for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert optimizers["table"].param_groups[0]["lr"] == pytest.approx(5e-3)
    assert isinstance(optimizers["matrix"], torch.optim.Muon)


def test_sparse_row_adam_equals_dense_adam_on_touched_rows():
    torch.manual_seed(0)
    w_sparse = torch.nn.Parameter(torch.randn(10, 3))
    w_dense = torch.nn.Parameter(w_sparse.detach().clone())
    sparse_opt = SparseRowAdam([w_sparse], lr=0.1, betas=(0.9, 0.99))
    dense_opt = torch.optim.Adam([w_dense], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    rows = torch.tensor([1, 4, 4, 7])  # a row read twice accumulates
    untouched = [i for i in range(10) if i not in (1, 4, 7)]
    before = w_sparse.detach().clone()
    for step in range(5):
        g = torch.randn(4, 3)
        torch.nn.functional.embedding(rows, w_sparse, sparse=True).mul(g).sum().backward()
        torch.nn.functional.embedding(rows, w_dense).mul(g).sum().backward()
        sparse_opt.step(), dense_opt.step()
        sparse_opt.zero_grad(), dense_opt.zero_grad()
    assert torch.allclose(w_sparse[[1, 4, 7]], w_dense[[1, 4, 7]], atol=1e-6)
    assert torch.equal(w_sparse.detach()[untouched], before[untouched])
    state = sparse_opt.state[w_sparse]
    assert state["exp_avg"][untouched].abs().sum() == 0 and state["exp_avg_sq"][untouched].abs().sum() == 0


def test_batched_muon_equals_torch_muon_in_bf16_and_is_close_in_fp32():
    from engram_lm.training.muon import Muon

    torch.manual_seed(0)
    shapes = [(16, 16)] * 3 + [(24, 8), (8, 40)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    bf16 = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    fp32 = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    opts = [torch.optim.Muon(ref, **kw), Muon(bf16, ns_dtype=torch.bfloat16, **kw), Muon(fp32, **kw)]
    for step in range(3):
        grads = [torch.randn(s) for s in shapes]
        for params, opt in zip((ref, bf16, fp32), opts):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ref, bf16))
    assert all(torch.allclose(a, b, atol=2e-3) and not torch.equal(a, b) for a, b in zip(ref, fp32))
    assert opts[2].state_dict()["state"][0].keys() == opts[0].state_dict()["state"][0].keys()


def test_table_weight_decay_shrinks_only_touched_rows():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 2))
    plain = torch.nn.Parameter(w.detach().clone())
    before = w.detach().clone()
    opts = [SparseRowAdam([w], lr=0.1, weight_decay=0.5), SparseRowAdam([plain], lr=0.1)]
    rows = torch.tensor([2, 5])
    for p in (w, plain):
        torch.nn.functional.embedding(rows, p, sparse=True).sum().backward()
    for opt in opts:
        opt.step()
    # decoupled: the decayed row is (1 - lr * wd) * old row + the same Adam update
    assert torch.allclose(w[rows] - plain[rows], -0.05 * before[rows], atol=1e-6)
    untouched = [0, 1, 3, 4]
    assert torch.equal(w.detach()[untouched], before[untouched])


def test_engram_dropout_acts_only_in_training():
    model = small_model(overencoding=None, engram=small_model().config.engram.with_(dropout=0.5, zero_init_output=False))
    ids = torch.randint(0, 128, (2, 8))
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])
    model.train()
    torch.manual_seed(1)
    a = model(ids)[0]
    torch.manual_seed(2)
    assert not torch.equal(a, model(ids)[0])


def test_lr_schedule_warmup_and_step_decay():
    m = [lr_multiplier(s, 100, 10, (0.8, 0.9), 0.5) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 and m[50] == 1.0
    assert m[80] == 0.5 and m[89] == 0.5 and m[90] == 0.25


def test_data_split_and_batches_are_deterministic():
    data = prepare_data("bible", "bpe:4096")
    assert data.eod_id == 0 and data.vocab_size == 4096
    assert is_val_document(10) and not is_val_document(11)
    assert 0.03 < len(data.val) / (len(data.train) + len(data.val)) < 0.08
    a = sample_batch(data.train, 4, 32, seed=1, step=7)
    b = sample_batch(data.train, 4, 32, seed=1, step=7)
    c = sample_batch(data.train, 4, 32, seed=1, step=8)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are inputs shifted by one
    w = eval_windows(data.val, 4, 32, 2)
    assert len(w) == 2 and torch.equal(w[0][0], eval_windows(data.val, 4, 32, 2)[0][0])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no text"),
        (lambda p: (p / "b.txt").write_bytes(b"\xff\xfe\x00bin") and p / "b.txt", "not UTF-8 text"),
        (lambda p: (p / "x.jsonl").write_text('{"title": 1}\n') and p / "x.jsonl", "no string field 'text'"),
        (lambda p: (p / "one.txt").write_text("only one document") and p / "one.txt", "at least 11 documents"),
    ],
)
def test_bad_data_paths_are_refused(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        prepare_data(str(make(tmp_path)), "bpe:4096")


def _user_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = [{"text": f"Record {i}: the quick brown fox jumps over the lazy dog {i % 7} times."} for i in range(40)]
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    (folder / "b.txt").write_text("A plain text document about foxes and dogs. " * 20)
    return folder


def test_user_corpus_jsonl_and_txt(tmp_path):
    data = prepare_data(str(_user_corpus(tmp_path)), "bpe:300")
    assert data.vocab_size == 300 and len(data.train) > 100


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("dropout", [{}, {"row_dropout": 0.3, "output_dropout": 0.3}], ids=["plain", "dropout"])
def test_kill_and_resume_gives_identical_losses(tmp_path, dropout):
    model_cfg, train_cfg = get_recipe("tiny")
    model_cfg = model_cfg.with_(engram=model_cfg.engram.with_(**dropout))  # dropout: the masks are drawn again alike
    train_cfg = train_cfg.with_(steps=12, save_every=4, eval_every=6)
    full = train(model_cfg, train_cfg, tmp_path / "full", progress=False)
    train(model_cfg, train_cfg, tmp_path / "cut", progress=False, stop_after=6)  # "dies" after step 6
    assert ckpt_io.latest_checkpoint(tmp_path / "cut").name == "step-000004"
    resumed = train(model_cfg, train_cfg, tmp_path / "cut", progress=False)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    assert resumed.val_loss == full.val_loss
    a, _ = load_trained(tmp_path / "full")
    b, _ = load_trained(tmp_path / "cut")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_half_written_checkpoint_is_ignored(tmp_path):
    model_cfg, train_cfg = get_recipe("tiny")
    train(model_cfg, train_cfg.with_(steps=4), tmp_path, progress=False)
    latest = ckpt_io.latest_checkpoint(tmp_path)
    shutil.copytree(latest, latest.with_name("step-000009.tmp"))  # a crash mid-save leaves *.tmp
    assert ckpt_io.latest_checkpoint(tmp_path) == latest


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    model_cfg, train_cfg = get_recipe("tiny")
    train(model_cfg, train_cfg.with_(steps=2), tmp_path / "run", progress=False)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "run")
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        load_trained(bad)
    (bad / "state.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a checkpoint of this tool"):
        load_trained(bad)
    with pytest.raises(ValueError, match="no state.json"):
        load_trained(tmp_path)


def test_checkpoint_from_another_layout_is_refused(tmp_path):
    model_cfg, train_cfg = get_recipe("tiny")
    train(model_cfg, train_cfg.with_(steps=2), tmp_path / "run", progress=False)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "run")
    state = ckpt_io.read_state(ckpt)
    model, _ = load_trained(ckpt)
    other = EngramLM(model.config.with_(engram=model.config.engram.with_(seed=1)))
    with pytest.raises(ValueError, match="hash layout"):
        ckpt_io.load_model_state(other, state, other.hasher.layout.fingerprint)


def test_changed_config_in_same_run_folder_is_refused(tmp_path):
    model_cfg, train_cfg = get_recipe("tiny")
    train(model_cfg, train_cfg.with_(steps=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration") as err:
        train(model_cfg.with_(dim=32), train_cfg.with_(steps=2), tmp_path, progress=False)
    assert "model.dim: 64 -> 32" in str(err.value) and "--set dim=64" in str(err.value)
    # a run saved before a default changed (here the table decay, off before): the error names the flags that resume it
    train(model_cfg, train_cfg.with_(steps=2, table_weight_decay=0.0), tmp_path / "old", progress=False)
    with pytest.raises(ValueError, match=r"train.table_weight_decay: 0.0 -> None\).*: --set table_weight_decay=0.0\)$"):
        train(model_cfg, train_cfg.with_(steps=4), tmp_path / "old", progress=False)
    train(model_cfg, train_cfg.with_(steps=4, table_weight_decay=0.0), tmp_path / "old", progress=False)  # resumes


def test_a_run_saved_before_a_config_field_was_added_resumes(tmp_path):
    # found in the study: a run checkpointed before EngramConfig.branch_fusion existed was refused
    # on resume ("branch_fusion: None -> True") although the field's default is what it trained with
    model_cfg, train_cfg = get_recipe("tiny")
    train(model_cfg, train_cfg.with_(steps=2), tmp_path, progress=False)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["requested"]["model"]["engram"]["branch_fusion"]  # as written by the older code
    path.write_text(json.dumps(saved))
    assert train(model_cfg, train_cfg.with_(steps=4), tmp_path, progress=False).tokens_seen == 4 * train_cfg.batch_size * train_cfg.seq_len
    with pytest.raises(ValueError, match=r"model.engram.branch_fusion: True -> False"):  # a real change still refused
        train(model_cfg.with_(engram=model_cfg.engram.with_(branch_fusion=False)), train_cfg.with_(steps=6), tmp_path,
              progress=False)  # fmt: skip


def test_training_with_tables_in_host_ram_gives_the_device_losses(tmp_path):
    model_cfg, train_cfg = get_recipe("tiny")
    train_cfg = train_cfg.with_(steps=6, eval_every=6)
    a = train(model_cfg, train_cfg, tmp_path / "device", progress=False)
    from engram_lm.memory.host_trainable import HostTableStepper

    launched = []
    original = HostTableStepper.launch
    HostTableStepper.launch = lambda self, m: (launched.append(m), original(self, m))[1]
    try:  # the host tables' optimizer steps on a worker, overlapped with the dense steps
        b = train(model_cfg, train_cfg, tmp_path / "ram", progress=False, memory="ram")
    finally:
        HostTableStepper.launch = original
    assert len(launched) == 6
    lines = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "device") == lines(tmp_path / "ram") and a.val_loss == b.val_loss  # losses, lr, val
    from safetensors.torch import load_file

    shard = "checkpoints/step-000006/table-shard-000.safetensors"
    ta, tb = load_file(tmp_path / "device" / shard), load_file(tmp_path / "ram" / shard)
    assert ta and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # rows and moments, bit for bit
    with pytest.raises(ValueError, match="--memory 'mmap'"):
        train(model_cfg, train_cfg, tmp_path / "x", progress=False, memory="mmap")


def test_host_table_dedup_path_matches_the_device_table():
    from engram_lm.memory.dense import DenseTable
    from engram_lm.memory.host_trainable import HostTrainableTable

    torch.manual_seed(0)
    dense = DenseTable(50, 4, sparse_grad=True)
    host = HostTrainableTable(dense.weight, dedup=True)
    rows = torch.randint(0, 50, (3, 7, 2))  # duplicates across positions
    g = torch.randn(3, 7, 2, 4)
    (dense(rows) * g).sum().backward()
    (host(rows) * g).sum().backward()
    assert torch.equal(dense(rows), host(rows))
    assert torch.allclose(dense.weight.grad.to_dense(), host.weight.grad.to_dense(), atol=1e-6)
    assert host.to("meta").weight.device.type == "cpu"  # moving the model leaves the rows on the host


def test_host_table_stepper_lands_the_update_before_the_next_lookup_and_reraises():
    from engram_lm.memory.host_trainable import HostTableStepper, HostTrainableTable
    from engram_lm.training.optim import SparseRowAdam

    table = HostTrainableTable(torch.zeros(10, 2))
    opt = SparseRowAdam([table.weight], lr=0.1)
    opt.param_groups[0]["base_lr"] = 0.1
    stepper = HostTableStepper(opt, [table])
    table(torch.tensor([1, 1, 3])).sum().backward()
    stepper.launch(0.5)  # this step's lr: 0.1 x 0.5; Adam's first step moves each touched entry by lr
    out = table(torch.tensor([1, 3, 0]))  # waits for the step
    assert torch.allclose(out, torch.tensor([[-0.05, -0.05], [-0.05, -0.05], [0.0, 0.0]]), atol=1e-6)
    assert table.weight.grad is None and opt.param_groups[0]["lr"] == 0.05

    def broken():
        raise RuntimeError("host step failed")

    table(torch.tensor([2])).sum().backward()
    opt.step = broken
    stepper.launch(1.0)
    with pytest.raises(RuntimeError, match="host step failed"):
        table(torch.tensor([2]))
    stepper.close()
