"""Token classes of the running-text sensitivity analysis, against hand-worked windows."""

import numpy as np
import pytest
import torch

from engram_lm.analysis.token_classes import BigramContinuations, copyable_mask, recallable_mask, token_classes


def test_copyable_means_an_earlier_copy_of_the_last_tokens_was_followed_by_the_target():
    s = torch.tensor([5, 6, 7, 5, 6, 7])  # targets of positions 0..4: 6, 7, 5, 6, 7
    # n = 2: only t = 4 ("5 6" -> 7) repeats an earlier "5 6" that was followed by 7
    assert copyable_mask(s, n=2).tolist() == [False, False, False, False, True]
    # n = 1: t = 3 ("5" -> 6, as after s0) and t = 4 ("6" -> 7, as after s1)
    assert copyable_mask(s, n=1).tolist() == [False, False, False, True, True]
    # an earlier copy followed by something else does not count
    assert copyable_mask(torch.tensor([5, 6, 1, 5, 6, 2]), n=2).tolist() == [False] * 5


def test_recallable_means_the_training_data_usually_continues_the_pair_with_the_target():
    train = np.array([1, 2, 3, 1, 2, 3, 1, 2, 4, 9, 9, 9])  # (1, 2) x3: -> 3 twice, -> 4 once
    stats = BigramContinuations(train, vocab_size=10)
    pair, triple = stats.counts(np.array([1, 1, 2]), np.array([2, 2, 3]), np.array([3, 4, 1]))
    assert pair.tolist() == [3, 3, 2] and triple.tolist() == [2, 1, 2]
    window = torch.tensor([7, 1, 2, 3])  # targets of positions 0..2: 1, 2, 3; t = 2 continues (1, 2) with 3
    assert recallable_mask(window, stats, min_count=3, min_share=0.5).tolist() == [False, False, True]
    assert recallable_mask(window, stats, min_count=4, min_share=0.5).tolist() == [False] * 3  # pair seen 3 times
    assert recallable_mask(torch.tensor([7, 1, 2, 4]), stats, min_count=3, min_share=0.5).tolist() == [False] * 3  # 1/3
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
        BigramContinuations(train, vocab_size=5)


def test_the_classes_are_disjoint_a_token_in_both_places_belongs_to_neither():
    stats = BigramContinuations(np.array([1, 2, 3] * 5), vocab_size=10)
    classes = token_classes(torch.tensor([1, 2, 3, 1, 2, 3, 8, 9, 5, 8, 9, 5]), stats, n=2, min_count=2)
    # t = 1..4 continue their pair as training does; t = 4 also copies the "1 2 -> 3" ending at j = 1: neither.
    # t = 10 ("8 9" -> 5) copies the "8 9 -> 5" ending at j = 7, a pair training never saw: copyable
    assert classes["copyable"].nonzero().flatten().tolist() == [10]
    assert classes["recallable"].nonzero().flatten().tolist() == [1, 2, 3]
