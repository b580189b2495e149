"""Dynamic Weight Average against hand-computed weights; its history lives in the state_dict."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.mtl.balancing import create_balancer


def _losses(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(a), "b": torch.tensor(b)}


def _dwa_weights(previous: tuple[float, float], last: tuple[float, float], temperature: float = 2.0) -> torch.Tensor:
    ratios = [last[0] / previous[0], last[1] / previous[1]]
    exps = [math.exp(r / temperature) for r in ratios]
    return torch.tensor([2 * e / sum(exps) for e in exps])


def test_weights_follow_the_formula():
    dwa = create_balancer("dwa", ["a", "b"])
    history = [(1.0, 2.0), (0.5, 1.8), (0.4, 1.0)]
    dwa(_losses(*history[0]))
    torch.testing.assert_close(dwa.weights, torch.ones(2))  # step 1: no history
    dwa.after_step(_losses(*history[0]))
    dwa(_losses(*history[1]))
    torch.testing.assert_close(dwa.weights, torch.ones(2))  # step 2: one entry only
    dwa.after_step(_losses(*history[1]))
    loss = dwa(_losses(3.0, 5.0))
    expected = _dwa_weights(history[0], history[1])
    torch.testing.assert_close(dwa.weights, expected)
    torch.testing.assert_close(loss, expected @ torch.tensor([3.0, 5.0]))
    assert dwa.weights[1] > dwa.weights[0]  # b's loss fell less, so b gets more weight
    dwa.after_step(_losses(*history[2]))
    dwa(_losses(1.0, 1.0))
    torch.testing.assert_close(dwa.weights, _dwa_weights(history[1], history[2]))


def test_period_averages_steps():
    dwa = create_balancer("dwa", ["a", "b"], temperature=1.0, period=2)
    for losses in [(1.0, 2.0), (3.0, 2.0), (1.0, 1.0), (1.0, 2.0)]:  # period averages (2, 2) then (1, 1.5)
        dwa.after_step(_losses(*losses))
    dwa(_losses(1.0, 1.0))
    torch.testing.assert_close(dwa.weights, _dwa_weights((2.0, 2.0), (1.0, 1.5), temperature=1.0))


def test_history_is_checkpointed():
    dwa = create_balancer("dwa", ["a", "b"])
    for losses in [(1.0, 2.0), (0.5, 1.8), (0.4, 1.0)]:
        dwa.after_step(_losses(*losses))
    state = dwa.state_dict()
    assert {"history", "running_sum", "running_count", "periods_done"} <= set(state)
    restored = create_balancer("dwa", ["a", "b"])
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.current_weights(), dwa.current_weights())
    assert not torch.allclose(restored.current_weights(), torch.ones(2))


@pytest.mark.parametrize(("kwargs", "message"), [({"temperature": 0.0}, "temperature"), ({"period": 0}, "period")])
def test_invalid_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_balancer("dwa", ["a", "b"], **kwargs)
