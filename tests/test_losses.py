"""The per-sample loss helper agrees with torch's reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ext.losses import per_sample_cross_entropy, require_keys, token_mean


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 7), c=st.integers(2, 6), seed=st.integers(0, 1000))
def test_token_mean_equals_torch_mean_with_ignored_positions(b, t, c, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = -100
    per_sample, n = per_sample_cross_entropy(logits, labels)
    assert per_sample.shape == n.shape == (b,)
    assert torch.equal(n, (labels != -100).sum(1))
    if n.sum() > 0:
        expected = F.cross_entropy(logits.reshape(-1, c), labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(token_mean(per_sample, n), expected)
    for i in range(b):
        keep = labels[i] != -100
        if keep.any():
            torch.testing.assert_close(per_sample[i], F.cross_entropy(logits[i][keep], labels[i][keep]))
        else:
            assert per_sample[i] == 0


def test_classification_shift_and_grad():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 1])
    ps, n = per_sample_cross_entropy(logits, labels)
    torch.testing.assert_close(ps, F.cross_entropy(logits, labels, reduction="none"))
    assert n.tolist() == [1, 1, 1, 1]
    ps.sum().backward()
    assert logits.grad is not None
    # causal shift: position t predicts label t + 1
    seq_logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    ps, n = per_sample_cross_entropy(seq_logits, ids, shift=True)
    torch.testing.assert_close(ps, F.cross_entropy(seq_logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                                   reduction="none").mean(1))
    assert n.tolist() == [4, 4]


def test_fp32_under_low_precision_and_shape_errors():
    ps, _ = per_sample_cross_entropy(torch.randn(2, 3, 5, dtype=torch.bfloat16), torch.randint(0, 5, (2, 3)))
    assert ps.dtype == torch.float32
    with pytest.raises(ValueError, match="expected logits"):
        per_sample_cross_entropy(torch.randn(2, 3, 5), torch.randint(0, 5, (3, 3)))


def test_require_keys_names_key_and_helper():
    with pytest.raises(KeyError, match=r"per_sample_loss.*per_sample_cross_entropy"):
        require_keys({"loss": torch.tensor(1.0)}, ("loss", "per_sample_loss"), "LossReweighting")
    with pytest.raises(TypeError, match="LossReweighting.*per_sample_cross_entropy"):
        require_keys(torch.tensor(1.0), ("loss", "per_sample_loss"), "LossReweighting")
    out = {"loss": 1, "per_sample_loss": 2}
    assert require_keys(out, ("loss", "per_sample_loss"), "X") is out
