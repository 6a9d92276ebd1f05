"""The non-finite checks: one fused read decides, the per-tensor pass names the first bad tensor, the loss check
returns the value it read."""
import math

import pytest
import torch

from slca_kit.errors import TrainingDiverged
from slca_kit.finite import ensure_finite_loss, ensure_finite_tensors


def _tensors():
    return [("tiny", torch.zeros(0)), ("half", torch.ones(3, dtype=torch.bfloat16)),
            ("huge", torch.full((2, 2), 3e38)), ("double", torch.arange(4, dtype=torch.float64)),
            ("count", torch.arange(3)), ("not a tensor", 7)]


def test_finite_tensors_of_mixed_dtypes_and_sizes_pass():
    ensure_finite_tensors(_tensors(), "parameter", "training", 0)  # 3e38 is finite: the max-abs does not overflow


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_entry_is_named_with_its_count_and_first_value(bad):
    named = _tensors()
    named[3][1][1] = bad
    named[3][1][3] = bad
    with pytest.raises(TrainingDiverged, match=rf"^training: task 2, epoch 1: parameter double has 2 non-finite "
                                               rf"values \(first {bad}\)"):
        ensure_finite_tensors(named, "parameter", "training", 2, 1)


def test_the_first_bad_tensor_in_order_is_named():
    named = [("a", torch.ones(2)), ("b", torch.tensor([1.0, math.nan])), ("c", torch.tensor([math.inf]))]
    with pytest.raises(TrainingDiverged, match="parameter b has 1 non-finite"):
        ensure_finite_tensors(named, "parameter", "training", 0)


def test_the_loss_check_returns_the_value_and_names_a_bad_one():
    assert ensure_finite_loss(torch.tensor(2.5, requires_grad=True) * 1, "training", 0) == 2.5
    with pytest.raises(TrainingDiverged, match=r"^training: task 0, epoch 3, step 4: loss is -inf; .* \(hint\)$"):
        ensure_finite_loss(torch.tensor(-math.inf), "training", 0, 3, 4, hint=" (hint)")
