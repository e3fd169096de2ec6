import csv

from engram_lm.experiments.allocation import allocation_sweep
from engram_lm.experiments.report import build_report
from engram_lm.experiments.variants import SCALING_SLOTS, ablation_configs, scaling_configs
from engram_lm.hashing.layout import build_layout


def test_scaling_points_span_16x_with_matching_slot_counts():
    assert SCALING_SLOTS[-1] / SCALING_SLOTS[0] >= 16 and len(SCALING_SLOTS) >= 5
    for slots in SCALING_SLOTS[:2]:
        cfgs = scaling_configs(slots)
        rows = {k: build_layout(c.engram or c.overencoding, 1, 0).total_rows for k, c in cfgs.items()}
        assert all(abs(r / slots - 1) < 0.02 for r in rows.values()), rows
        assert cfgs["engram"].overencoding is None and cfgs["overencoding"].engram is None
        base = {k: v for k, v in cfgs["engram"].to_dict().items() if k not in ("engram", "overencoding")}
        assert base == {k: v for k, v in cfgs["overencoding"].to_dict().items() if k not in ("engram", "overencoding")}


def test_each_ablation_changes_one_thing():
    variants = ablation_configs()
    ref = variants["reference"].engram.to_dict()
    expected = {"no_gating": {"use_gating"}, "no_compression": {"compress_tokens"},
                "no_short_conv": {"use_short_conv"}, "with_4grams": {"max_ngram", "table_sizes"}}  # fmt: skip
    for name, cfg in variants.items():
        changed = {k for k, v in cfg.engram.to_dict().items() if v != ref[k]}
        assert changed == expected.get(name, {"layer_ids"} if name != "reference" else set()), name
    four = variants["with_4grams"].engram
    slots = lambda e: build_layout(e, 1, 0).total_rows  # noqa: E731
    assert abs(slots(four) / slots(variants["reference"].engram) - 1) < 0.02  # same number of slots


def test_allocation_sweep_and_report(tmp_path):
    rows = allocation_sweep(tmp_path / "allocation", rhos=(0.55, 1.0), steps=2, progress=False)
    assert [r["rho"] for r in rows] == [0.55, 1.0]
    assert rows[1]["engram_slots"] == 0 and rows[0]["engram_slots"] > 0
    assert abs(rows[0]["params_total"] / rows[1]["params_total"] - 1) < 0.02
    with (tmp_path / "allocation" / "allocation.csv").open() as f:
        assert list(csv.DictReader(f))[0].keys() >= {"rho", "num_routed_experts", "engram_slots", "params_total",
                                                     "params_active", "val_loss"}  # fmt: skip
    assert (tmp_path / "allocation" / "allocation.png").exists()
    text = build_report(tmp_path, tmp_path / "docs" / "results.md")
    assert "U-shape" in text and "engram experiment allocation" in text and "Not run yet" in text
    assert (tmp_path / "docs" / "figures" / "allocation.png").exists()
