import pytest
import torch

from engram_lm.config import EngramConfig
from engram_lm.models.accounting import allocate, count_config, count_params
from engram_lm.models.config import ModelConfig
from engram_lm.models.overencoding import OverEncodingConfig
from engram_lm.models.transformer import EngramLM

V = 256


def engram_cfg(**kw):
    base = dict(tokenizer=f"identity:{V}", table_sizes=(211, 199), max_ngram=3, num_heads=2, layer_ids=(1,),
                pad_id=0, embed_per_ngram=16)  # fmt: skip
    return EngramConfig(**{**base, **kw})


def model_cfg(**kw):
    base = dict(vocab_size=V, dim=32, num_layers=3, num_heads=4, max_seq_len=64, ffn_hidden=64,
                num_routed_experts=4, num_shared_experts=1, top_k=2, expert_hidden=16)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def build(**kw):
    torch.manual_seed(0)
    return EngramLM(model_cfg(**kw))


@pytest.mark.parametrize("branches", [1, 3])
@pytest.mark.parametrize("memory", ["none", "engram", "overencoding"])
def test_model_is_causal(branches, memory):
    extra = {}
    if memory == "engram":
        extra["engram"] = engram_cfg(zero_init_conv=False)
    if memory == "overencoding":
        extra["overencoding"] = OverEncodingConfig(slots=97, table_dim=8, num_splits=2)
    model = build(num_branches=branches, **extra).eval()
    ids = torch.randint(0, V, (2, 12))
    ids2 = ids.clone()
    ids2[:, 7:] = (ids2[:, 7:] + 5) % V
    a, _ = model(ids)
    b, _ = model(ids2)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_zero_init_engram_leaves_outputs_unchanged():
    base = build().eval()
    with_engram = build(engram=engram_cfg(zero_init_output=True)).eval()
    sd = base.state_dict()
    missing = with_engram.load_state_dict(sd, strict=False).missing_keys
    assert missing and all(".engram." in k for k in missing)
    ids = torch.randint(0, V, (2, 10))
    assert torch.equal(base(ids)[0], with_engram(ids)[0])


def test_single_branch_model_equals_plain_residual_computation():
    model = build(num_branches=1).eval()
    ids = torch.randint(0, V, (1, 6))
    x = model.embed(ids)
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    for block in model.blocks:
        x = x + block.attn(block.attn_norm(x), cos, sin)
        x = x + block.ffn(block.ffn_norm(x))
    want = model.head(model.norm(x))
    assert torch.allclose(model(ids)[0], want, atol=1e-6)


@pytest.mark.parametrize("fusion", [True, False])
def test_incremental_decoding_equals_full_forward(fusion):
    model = build(num_branches=2, engram=engram_cfg(zero_init_conv=False, branch_fusion=fusion), eod_id=3).eval()
    ids = torch.randint(0, V, (2, 15))
    ids[0, 5] = 3  # a document boundary inside the row
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(2)
        parts = [model(ids[:, :6], cache=cache)[0]] + [model(ids[:, t : t + 1], cache=cache)[0] for t in range(6, 15)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_loss_ignores_minus_100_and_matches_cross_entropy():
    model = build().eval()
    ids = torch.randint(0, V, (2, 8))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    logits, loss = model(ids, targets)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), targets[:, :-1].reshape(-1))
    assert torch.allclose(loss, want, atol=1e-6)


@pytest.mark.parametrize(
    "ids, message",
    [(torch.tensor([[1, V]]), "token ids must lie in"), (torch.tensor([1, 2]), "shape \\(B, T\\)"),
     (torch.zeros(1, 65, dtype=torch.long), "exceeds max_seq_len")],
)  # fmt: skip
def test_bad_ids_are_refused(ids, message):
    with pytest.raises(ValueError, match=message):
        build()(ids)


@pytest.mark.parametrize(
    "changes, message",
    [({"top_k": 5}, "top_k"), ({"num_heads": 5}, "divisible"), ({"engram": engram_cfg(layer_ids=(3,))}, "num_layers"),
     ({"overencoding": engram_cfg(layer_ids=(0,))}, "OverEncodingConfig"), ({"num_branches": 0}, "num_branches")],
)  # fmt: skip
def test_invalid_model_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        model_cfg(**changes)


def test_param_counts_by_hand():
    model = build(num_routed_experts=4, top_k=1, num_shared_experts=0, num_layers=2, num_dense_layers=1)
    c = count_params(model)
    D, F, H = 32, 64, 16
    attn = 4 * D * D
    norms = 2 * D
    dense_block = attn + 3 * D * F + norms
    expert = 3 * D * H
    moe_block = attn + 4 * expert + D * 4 + norms  # router D x E
    assert c.total == dense_block + moe_block + D  # + final norm
    assert c.active == dense_block + (moe_block - 3 * expert) + D
    assert c.vocab == 2 * V * D and c.engram == 0


def test_engram_rows_count_as_sparse_and_read_rows_as_active():
    plain = count_config(model_cfg())
    withe = count_config(model_cfg(engram=engram_cfg()))
    engram = build(engram=engram_cfg()).blocks[1].engram
    dense_engram = sum(p.numel() for n, p in engram.named_parameters() if not n.startswith("memory"))
    assert withe.engram == engram.memory.weight.numel()
    assert withe.total - plain.total == withe.engram + dense_engram
    assert withe.active - plain.active == dense_engram + 32  # d_mem = 2 orders x 16


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75])
def test_allocate_keeps_total_and_active_params(rho):
    base = model_cfg(num_routed_experts=12, top_k=2, expert_hidden=32, ffn_hidden=128)
    target = count_config(base)
    cfg = allocate(base, rho, engram_cfg(embed_per_ngram=16))
    got = count_config(cfg)
    assert cfg.num_routed_experts == 2 + round(rho * 10)
    assert abs(got.total / target.total - 1) < 0.02
    assert abs(got.active / target.active - 1) < 0.02
    assert got.engram > 0
    assert allocate(base, 1.0, engram_cfg()) == base
