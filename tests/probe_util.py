"""Test helpers shared by the probe tests: a tokenizer over words and punctuation."""

import re


class PieceTokenizer:
    """Words and punctuation, one id each; ids are given as text is first seen (0 is <pad>)."""

    def __init__(self):
        self.ids: dict[str, int] = {"<pad>": 0}

    def encode(self, text, add_special_tokens=False):
        class _Encoding:
            pass

        e = _Encoding()
        e.ids = [self.ids.setdefault(w, len(self.ids)) for w in re.findall(r"\w+|[^\w\s]", text)]
        return e
