"""Equal and fixed weighting: the sum convention and the weight-vector checks."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.mtl.balancing import create_balancer


def test_equal_is_the_sum():
    equal = create_balancer("equal", ["a", "b"])
    torch.testing.assert_close(equal({"b": torch.tensor(2.0), "a": torch.tensor(0.5)}), torch.tensor(2.5))
    torch.testing.assert_close(equal.weights, torch.ones(2))


def test_fixed_weights_follow_task_order():
    fixed = create_balancer("fixed", ["a", "b"], weights=[0.1, 10.0])
    torch.testing.assert_close(fixed({"b": torch.tensor(2.0), "a": torch.tensor(5.0)}), torch.tensor(20.5))
    torch.testing.assert_close(fixed.weights, torch.tensor([0.1, 10.0]))


def test_fixed_wrong_number_of_weights():
    with pytest.raises(ValueError, match="expected 3 weights .* got 2"):
        create_balancer("fixed", ["a", "b", "c"], weights=[1.0, 2.0])
