import pytest
import torch

from engram_lm.compat import from_reference
from engram_lm.hashing.hasher import NgramHasher
from engram_lm.tokenizer.sources import load_tokenizer, resolve_tokenizer

from demo_restatement import DemoEngram

REF_CONFIG = dict(
    tokenizer="deepseek-v3", engram_vocab_size=[3001, 2003], max_ngram_size=3, n_embed_per_ngram=32,
    n_head_per_ngram=4, layer_ids=[1, 15], layer_id=15, pad_id=2, seed=0, kernel_size=4,
    hidden_size=48, hc_mult=4,
)  # fmt: skip


def _demo(config, v3_projection):
    from engram_lm.compat.reference import config_from_reference

    torch.manual_seed(0)
    hasher = NgramHasher.from_config(config_from_reference(config), v3_projection)
    demo = DemoEngram(hasher.layout, v3_projection, config["layer_id"], config["n_embed_per_ngram"],
                      config["hidden_size"], config["hc_mult"], config["kernel_size"])  # fmt: skip
    for p in demo.parameters():  # non-trivial norms and biases, not just their inits
        torch.nn.init.normal_(p, std=0.5)
    return demo


def test_from_reference_reproduces_demo_forward(v3_projection):
    demo = _demo(REF_CONFIG, v3_projection)
    tok = load_tokenizer(resolve_tokenizer("deepseek-v3"))
    texts = ["Only Alexander the Great could tame the horse Bucephalus.", "By the way, the Milky Way!"]
    ids = [tok.encode(t).ids[:12] for t in texts]
    ids = torch.tensor([i + [2] * (12 - len(i)) for i in ids])
    h = torch.randn(2, 12, 4, 48)
    engram = from_reference(demo.state_dict(), REF_CONFIG)
    with torch.no_grad():
        want = demo(h, ids.numpy())
    got = engram(h, ids)
    assert got.shape == (2, 12, 4, 48)
    assert (got - want).abs().max().item() < 1e-5


def test_from_reference_accepts_prefixed_state_dict(v3_projection):
    demo = _demo(REF_CONFIG, v3_projection)
    sd = {f"layers.15.engram.{k}": v for k, v in demo.state_dict().items()}
    h, ids = torch.randn(1, 5, 4, 48), torch.tensor([[100, 200, 300, 400, 500]])
    with torch.no_grad():
        assert torch.allclose(from_reference(sd, REF_CONFIG)(h, ids), demo(h, ids.numpy()), atol=1e-5)


def test_from_reference_refuses_mismatched_weights(v3_projection):
    demo = _demo(REF_CONFIG, v3_projection)
    other = {**REF_CONFIG, "engram_vocab_size": [5003, 2003]}
    with pytest.raises(ValueError, match="offsets"):
        from_reference(demo.state_dict(), other)
    sd = dict(demo.state_dict())
    del sd["key_projs.3.weight"]
    with pytest.raises(ValueError, match="lacks 'key_projs.3.weight'"):
        from_reference(sd, REF_CONFIG)
    with pytest.raises(ValueError, match="reference config lacks \\['hc_mult'\\]"):
        from_reference(demo.state_dict(), {k: v for k, v in REF_CONFIG.items() if k != "hc_mult"})
    with pytest.raises(ValueError, match="layer_id 3 is not one of"):
        from_reference(demo.state_dict(), {**REF_CONFIG, "layer_id": 3})
