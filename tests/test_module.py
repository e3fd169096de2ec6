import pytest
import torch

from engram_lm.config import EngramConfig
from engram_lm.engram import Engram, ShortConv, gate_values, squash
from engram_lm.hashing.hasher import NgramHasher
from engram_lm.hashing.layout import build_layout
from engram_lm.tokenizer.compression import VocabProjection


def make(num_branches=1, **changes):
    cfg = EngramConfig(
        tokenizer="identity:64", table_sizes=(97, 89), max_ngram=3, num_heads=2, layer_ids=(0,),
        pad_id=0, embed_per_ngram=8, hidden_size=16, num_branches=num_branches, **changes,
    )  # fmt: skip
    hasher = NgramHasher(build_layout(cfg, 64, 0), VocabProjection.identity(64))
    torch.manual_seed(0)
    return Engram(cfg, hasher.layout.layer(0).rows), hasher


def rows_for(hasher, ids):
    return hasher(ids, global_rows=True)[0]


def test_squash_hand_values():
    s = torch.tensor([4.0, -9.0, 0.0, 1e-8])
    assert squash(s).tolist() == pytest.approx([2.0, -3.0, 0.0, 1e-3])


def test_gate_hand_value():
    # one branch, D=2: rms-normed h = [1, 1], rms-normed k = [1, -1]; dot 0 -> alpha 0.5
    h = torch.tensor([[[[3.0, 3.0]]]])
    k = torch.tensor([[[[2.0, -2.0]]]])
    ones = torch.ones(1, 2)
    assert gate_values(h, k, ones, ones, eps=0.0).item() == pytest.approx(0.5)
    # aligned: dot of normed vectors = 2, / sqrt(2) -> squash -> 2**0.25
    k2 = torch.tensor([[[[5.0, 5.0]]]])
    want = torch.sigmoid(torch.tensor(2**0.25)).item()
    assert gate_values(h, k2, ones, ones, eps=0.0).item() == pytest.approx(want, rel=1e-6)


def test_zero_init_conv_is_identity_on_u():
    conv = ShortConv(16, 4, kernel_size=4, dilation=3, zero_init=True)
    u = torch.randn(2, 7, 4, 16)
    assert torch.equal(conv(u), torch.zeros_like(u))
    engram, hasher = make(num_branches=4)
    no_conv, _ = make(num_branches=4, use_short_conv=False)
    no_conv.load_state_dict({k: v for k, v in engram.state_dict().items() if "short_conv" not in k})
    ids, h = torch.randint(0, 64, (2, 9)), torch.randn(2, 9, 4, 16)
    assert torch.equal(engram(h, rows_for(hasher, ids)), no_conv(h, rows_for(hasher, ids)))


@pytest.mark.parametrize("num_branches, fusion", [(1, True), (4, True), (4, False)])
def test_module_is_causal(num_branches, fusion):
    engram, hasher = make(num_branches=num_branches, branch_fusion=fusion, zero_init_conv=False)
    ids, h = torch.randint(0, 64, (2, 12)), torch.randn(2, 12, num_branches, 16)
    y = engram(h, rows_for(hasher, ids))
    ids2, h2 = ids.clone(), h.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 1) % 64
    h2[:, 8:] += 1.0
    y2 = engram(h2, rows_for(hasher, ids2))
    assert torch.allclose(y[:, :8], y2[:, :8], atol=0, rtol=0)
    assert not torch.allclose(y[:, 8:], y2[:, 8:])


def test_single_branch_accepts_plain_residual_shape():
    engram, hasher = make(num_branches=1, zero_init_conv=False)
    ids, h = torch.randint(0, 64, (3, 5)), torch.randn(3, 5, 16)
    y3 = engram(h, rows_for(hasher, ids))
    y4 = engram(h.unsqueeze(2), rows_for(hasher, ids))
    assert y3.shape == (3, 5, 16) and torch.equal(y3, y4.squeeze(2))


def test_branches_share_value_but_gate_separately():
    engram, hasher = make(num_branches=4, use_short_conv=False)
    ids, h = torch.randint(0, 64, (1, 6)), torch.randn(1, 6, 4, 16)
    y = engram(h, rows_for(hasher, ids))
    assert y.shape == (1, 6, 4, 16)
    ratio = y[:, :, 1] / y[:, :, 0]  # each branch is alpha_m * v: ratios are constant over D
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4)
    assert not torch.allclose(y[:, :, 1], y[:, :, 0])


def test_token_mask_forces_gate_to_zero():
    engram, hasher = make(num_branches=2, use_short_conv=False)
    ids, h = torch.randint(0, 64, (1, 4)), torch.randn(1, 4, 2, 16)
    mask = torch.tensor([[True, False, True, False]])
    y = engram(h, rows_for(hasher, ids), token_mask_BT=mask)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1])) and y[:, 0].abs().sum() > 0


def test_without_gating_output_is_the_value():
    engram, hasher = make(num_branches=2, use_short_conv=False, use_gating=False)
    ids, h = torch.randint(0, 64, (1, 4)), torch.randn(1, 4, 2, 16)
    rows = rows_for(hasher, ids)
    e = engram.memory(rows).flatten(-2)
    v = engram.key_value(e)[..., -16:]
    assert torch.allclose(engram(h, rows), v.unsqueeze(2).expand(-1, -1, 2, -1))
    assert engram.gate is None


def test_gradients_reach_only_looked_up_rows():
    engram, hasher = make(num_branches=1, zero_init_conv=False)
    ids, h = torch.randint(0, 64, (2, 5)), torch.randn(2, 5, 1, 16)
    rows = rows_for(hasher, ids)
    engram(h, rows).sum().backward()
    touched = engram.memory.weight.grad.abs().sum(-1) > 0
    assert set(touched.nonzero().flatten().tolist()) <= set(rows.flatten().tolist())
    assert touched.any()


@pytest.mark.parametrize(
    "h_shape, rows_dtype, message",
    [
        ((2, 5, 1, 15), torch.int64, "check hidden_size"),
        ((2, 5, 3, 16), torch.int64, "num_branches"),
        ((2, 5, 1, 16), torch.int32, "int64"),
    ],
)
def test_shape_and_dtype_mismatches_are_refused(h_shape, rows_dtype, message):
    engram, hasher = make(num_branches=1)
    rows = rows_for(hasher, torch.randint(0, 64, (2, 5))).to(rows_dtype)
    with pytest.raises(ValueError, match=message):
        engram(torch.randn(h_shape), rows)


def test_v41_layout_matches_folded_gate_formula():
    # V4.1 (spec s.8): fused wkv without bias, no conv; with q_w, k_w the gate score is
    # sum(h * q_w * k_w * key) / (rms(h) * rms(key) * sqrt(D)), rms(x) = sqrt(mean(x^2) + eps)
    engram, hasher = make(num_branches=2, use_short_conv=False, projection_bias=False, gate_eps=1e-6)
    assert engram.key_value.bias is None and engram.short_conv is None
    torch.nn.init.normal_(engram.gate.query_weight)
    torch.nn.init.normal_(engram.gate.key_weight)
    ids, h = torch.randint(0, 64, (2, 5)), torch.randn(2, 5, 2, 16)
    rows = rows_for(hasher, ids)
    kv = engram.memory(rows).flatten(-2) @ engram.key_value.weight.T
    key, value = kv[..., :32].unflatten(-1, (2, 16)), kv[..., 32:]
    rms = lambda x: (x.pow(2).mean(-1) + 1e-6).sqrt()
    s = (h * engram.gate.query_weight * engram.gate.key_weight * key).sum(-1) / (rms(h) * rms(key) * 4.0)
    gate = torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())
    want = gate.unsqueeze(-1) * value.unsqueeze(2)
    assert torch.allclose(engram(h, rows), want, atol=1e-5)


def test_row_dropout_drops_whole_rows_and_rescales_the_rest():
    from engram_lm.engram.module import drop_rows

    torch.manual_seed(0)
    e = torch.randn(4, 50, 6, 8)  # (B, T, H, d)
    out = drop_rows(e, 0.3, training=True)
    zero = (out == 0).all(-1)  # a dropped row is zero in every coordinate
    kept = ~zero
    assert torch.allclose(out[kept], e[kept] / 0.7)  # the others are scaled by 1 / (1 - p)
    assert ((out == 0) == zero.unsqueeze(-1)).all()  # never a partly dropped row
    assert 0.25 < zero.float().mean().item() < 0.35  # 1,200 rows at p = 0.3
    assert drop_rows(e, 0.3, training=False) is e and drop_rows(e, 0.0, training=True) is e


def test_row_dropout_is_off_at_inference_and_changes_training_outputs():
    ids, h = torch.randint(0, 64, (2, 6)), torch.randn(2, 6, 1, 16)
    plain, hasher = make(zero_init_conv=False)
    dropped, _ = make(zero_init_conv=False, row_dropout=0.5)  # same seed: the same weights
    rows = rows_for(hasher, ids)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(h, rows), dropped(h, rows))
    dropped.train()
    assert not torch.allclose(plain(h, rows), dropped(h, rows))
    with pytest.raises(ValueError, match="row_dropout"):
        make(row_dropout=1.0)


def test_output_dropout_is_off_at_inference_and_zeroes_output_coordinates_in_training():
    ids, h = torch.randint(0, 64, (2, 6)), torch.randn(2, 6, 1, 16)
    plain, hasher = make(zero_init_conv=False)
    dropped, _ = make(zero_init_conv=False, output_dropout=0.5)
    rows = rows_for(hasher, ids)
    plain.eval(), dropped.eval()
    y = plain(h, rows)
    assert torch.equal(y, dropped(h, rows))
    dropped.train()
    torch.manual_seed(1)
    out = dropped(h, rows)
    zeroed = out == 0
    assert zeroed.any() and torch.allclose(out[~zeroed], 2 * y[~zeroed], atol=1e-6)  # the rest scaled by 1 / (1 - p)


def test_without_branch_fusion_one_module_reads_the_branch_mean_and_feeds_every_branch():
    # the ablation of multi-branch fusion: one key projection, gate and conv norm on the mean of
    # the M branches, the same Y added to every branch; i.e. an M = 1 module applied to mean(h)
    shared, hasher = make(num_branches=4, branch_fusion=False, zero_init_conv=False)
    single, _ = make(num_branches=1, zero_init_conv=False)
    assert shared.key_value.weight.shape == single.key_value.weight.shape == (2 * 16, 16)
    assert shared.gate.query_weight.shape == (1, 16) and shared.short_conv.weight.shape == (16, 1, 4)
    single.load_state_dict(shared.state_dict())
    torch.nn.init.normal_(single.gate.query_weight)  # not the ones of a fresh module
    shared.gate.query_weight.data.copy_(single.gate.query_weight)
    ids, h = torch.randint(0, 64, (2, 9)), torch.randn(2, 9, 4, 16)
    rows = rows_for(hasher, ids)
    y = shared(h, rows)
    want = single(h.mean(dim=2), rows)
    assert y.shape == h.shape
    for m in range(4):
        assert torch.allclose(y[:, :, m], want, atol=1e-6)
    fused, _ = make(num_branches=4, zero_init_conv=False)  # with fusion the branches differ
    assert fused.key_value.weight.shape == (5 * 16, 16)
    y_fused = fused(h, rows)
    assert not torch.allclose(y_fused[:, :, 0], y_fused[:, :, 1])


def test_zero_init_output_zeroes_the_value_rows_with_and_without_branch_fusion():
    for fusion in (True, False):
        engram, hasher = make(num_branches=4, branch_fusion=fusion, zero_init_output=True, zero_init_conv=False)
        G = 4 if fusion else 1
        assert engram.key_value.weight[: G * 16].abs().sum() > 0  # the keys are left as initialised
        ids, h = torch.randint(0, 64, (2, 5)), torch.randn(2, 5, 4, 16)
        assert torch.equal(engram(h, rows_for(hasher, ids)), torch.zeros_like(h))


@pytest.mark.parametrize("T, dilation, branches", [(1, 3, 1), (7, 3, 1), (40, 4, 2), (2, 1, 4)])
def test_the_tap_sum_conv_equals_one_conv1d_over_the_sequence_and_streams_the_same(T, dilation, branches):
    """ShortConv computes the depthwise conv as K multiply-adds (oneDNN's conv1d setup cost 167 us of a
    CPU decode step); the readable reference is one F.conv1d: equal, and equal again step by step."""
    from engram_lm.engram.conv import ShortConv, reference_conv

    torch.manual_seed(T)
    conv = ShortConv(16, branches, dilation=dilation, zero_init=False)
    u = torch.randn(2, T, branches, 16)
    trained = conv(u)  # with gradients: F.conv1d, as every run was trained
    with torch.no_grad():
        full = conv(u)  # without: the taps
        assert torch.equal(full, reference_conv(conv, u)) and torch.equal(full, trained.detach())
        state = conv.init_state(2, "cpu", torch.float32)
        streamed = torch.cat([conv(u[:, t : t + 1], state) for t in range(T)], dim=1)
    assert torch.equal(streamed, full)
