import json

import numpy as np
import pytest

from engram_lm.tokenizer import cache as cache_mod
from engram_lm.tokenizer.cache import load_projection
from engram_lm.tokenizer.compression import VocabProjection, build_lookup, canonical_key
from engram_lm.tokenizer.sources import load_tokenizer, resolve_tokenizer


@pytest.mark.parametrize(
    "text, key",
    [
        (" The", "the"),  # leading space stripped, lowercased
        ("THE", "the"),
        ("Émile", "emile"),  # accent stripped (NFD + drop combining marks)
        ("ﬁ", "fi"),  # NFKC compatibility ligature
        ("a \t\n b", "a b"),  # whitespace runs collapse to one space
        (" ", " "),  # a lone space is protected from Strip
        ("\t", " "),
        ("\n\n", " "),
        ("  ", " "),
        ("\u0301", "\u0301"),  # normalises to "" -> the text itself is the key
    ],
)
def test_canonical_key_normalisation(text, key):
    assert canonical_key(text, raw_token="RAW") == key


def test_partial_utf8_uses_raw_token_string():
    assert canonical_key("ab\ufffd", raw_token="Ġab\u00e2") == "Ġab\u00e2"


def test_build_lookup_numbers_keys_by_first_occurrence():
    lookup, keys = build_lookup(["x", "y", "x", "z", "y"])
    assert lookup.tolist() == [0, 1, 0, 2, 1]
    assert keys == ["x", "y", "z"]


def test_compress_passes_negative_ids_through():
    proj = VocabProjection(lookup=np.array([0, 0, 1]), keys=("a", "b"), source="t")
    assert proj.compress_numpy(np.array([[2, -1, 0, 1, -7]])).tolist() == [[1, -1, 0, 0, -7]]


def test_compress_rejects_ids_outside_vocabulary():
    proj = VocabProjection.identity(5)
    with pytest.raises(ValueError, match=r"outside the raw vocabulary \[0, 5\)"):
        proj.compress_numpy(np.array([1, 5]))


def test_deepseek_v3_reproduces_paper_table_6(v3_projection):
    assert v3_projection.raw_size == 128_815
    assert v3_projection.compressed_size == 98_627
    assert round(v3_projection.reduction, 4) == 0.2344  # 23.43% in the paper (truncated)
    top = [(key, count) for _, key, count, _ in v3_projection.top_merges(5)]
    assert top == [(" ", 163), ("a", 54), ("o", 40), ("e", 35), ("i", 30)]


def test_deepseek_v3_merges_case_and_space_variants(v3_projection):
    tok = load_tokenizer(resolve_tokenizer("deepseek-v3"))
    ids = [tok.token_to_id(t) for t in ("The", "Ġthe", "the", "ĠThe")]
    assert None not in ids
    assert len({int(v3_projection.lookup[i]) for i in ids}) == 1


def test_deepseek_v4_compresses_to_99092(v4_tokenizer_path):
    proj = load_projection(v4_tokenizer_path)
    assert (proj.raw_size, proj.compressed_size) == (129_280, 99_092)


def test_projection_cache_hit_and_invalidation(word_tokenizer_file, tmp_path, monkeypatch):
    path = word_tokenizer_file(["<unk>", "The", "the", " the", "cat"])
    cache_dir = tmp_path / "cache"
    first = load_projection(str(path), cache_dir=cache_dir)
    assert first.lookup.tolist() == [0, 1, 1, 1, 2]
    assert len(list((cache_dir / "compression").glob("*.json"))) == 1

    def no_build(*a, **k):
        raise AssertionError("cache miss: the projection was rebuilt")

    monkeypatch.setattr(cache_mod.VocabProjection, "from_tokenizer", no_build)
    again = load_projection(str(path), cache_dir=cache_dir)
    assert again.lookup.tolist() == first.lookup.tolist() and again.keys == first.keys

    monkeypatch.undo()
    path2 = word_tokenizer_file(["<unk>", "The", "the", " the", "cat", "Cat"])
    path2.replace(path)  # same path, new content -> new key
    changed = load_projection(str(path), cache_dir=cache_dir)
    assert changed.lookup.tolist() == [0, 1, 1, 1, 2, 2]
    assert len(list((cache_dir / "compression").glob("*.json"))) == 2


def test_damaged_cache_is_rebuilt(word_tokenizer_file, tmp_path):
    path = word_tokenizer_file(["<unk>", "A", "a"])
    cache_dir = tmp_path / "cache"
    load_projection(str(path), cache_dir=cache_dir)
    (cache_file,) = (cache_dir / "compression").glob("*.json")
    cache_file.write_text(json.dumps({"lookup": [0, 9, 9], "keys": ["x"]}))
    assert load_projection(str(path), cache_dir=cache_dir).lookup.tolist() == [0, 1, 1]


def test_unknown_tokenizer_name_names_the_fix():
    with pytest.raises(ValueError, match="not a built-in name.*deepseek-v3"):
        resolve_tokenizer("deepseek-v9")


def test_unreadable_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        load_projection(str(bad), cache_dir=tmp_path)


def test_folder_with_tokenizer_json_resolves(word_tokenizer_file):
    path = word_tokenizer_file(["<unk>", "x"], name="tokenizer.json")
    assert resolve_tokenizer(path.parent).path == path


def test_identity_projection_spec():
    proj = load_projection("identity:7")
    assert proj.compressed_size == 7 and proj.reduction == 0.0
    with pytest.raises(ValueError, match="identity:V"):
        load_projection("identity:x")
