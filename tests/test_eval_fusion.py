"""fuse_document_results: partial rows summed per document, greedy only if every token was, errors named."""

import numpy as np
import pytest

from xlstm_eqx.eval.fusion import fuse_document_results


def rows(index, ll, ll_counts, correct, targets):
    return {
        "document_idx_single_noreduce": np.asarray(index),
        "loglikelihood_single_noreduce_wcount": (np.asarray(ll), np.asarray(ll_counts)),
        "accuracies_single_noreduce_wcount": (np.asarray(correct), np.asarray(targets)),
    }


def test_partial_rows_are_summed_in_document_order():
    # document 2 split over three rows (out of order), document 1 over one, padding rows anywhere
    fused = fuse_document_results(rows([2, 0, 1, 2, 2, 0], [-1.0, 0.0, -4.0, -2.5, -0.5, 0.0],
                                       [3, 0, 5, 4, 1, 0], [3, 0, 4, 4, 1, 0], [3, 0, 5, 4, 1, 0]))  # fmt: skip
    assert fused == [(-4.0, False), (-4.0, True)]


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"documents missing from the results \(first ones: \[2\]\)"):
        fuse_document_results(rows([1, 3], [-1.0, -1.0], [1, 1], [1, 1], [1, 1]))
    with pytest.raises(ValueError, match="row 1: 2 targets in the log-likelihood, 3 in the accuracies"):
        fuse_document_results(rows([1, 1], [-1.0, -1.0], [1, 2], [1, 1], [1, 3]))
    with pytest.raises(KeyError, match="accuracies_single_noreduce_wcount"):
        fuse_document_results({k: v for k, v in rows([1], [-1.0], [1], [1], [1]).items() if "accur" not in k})
    assert fuse_document_results(rows([0, 0], [0.0, 0.0], [0, 0], [0, 0], [0, 0])) == []
