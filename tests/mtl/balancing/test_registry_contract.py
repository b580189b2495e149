"""Contract over every registered balancing method: defaults work, shapes, finiteness, checkpoints, errors."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from lightning_mtl.mtl.balancing import (
    GradientAggregator,
    LossWeighting,
    balancer_class,
    create_balancer,
    list_balancers,
)

TASKS = ["a", "b", "c"]
EXPECTED = {
    "weighting": ["dwa", "equal", "famo", "fixed", "gls", "gradnorm", "rlw", "stch", "uncertainty"],
    "aggregator": ["aligned_mtl", "cagrad", "conflict_free", "cr_mogm", "db_mtl", "dualproj", "excess_mtl", "fairgrad",
                   "graddrop", "gradvac", "imtl", "imtl_g", "mean", "mgda", "moco", "modo", "nash_mtl", "pcd", "pcgrad",
                   "rgw", "sdmgrad", "upgrad"],
}


def test_every_method_is_registered():
    assert list_balancers("weighting") == EXPECTED["weighting"]
    assert list_balancers("aggregator") == EXPECTED["aggregator"]


def _task_losses() -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[nn.Parameter]]:
    torch.manual_seed(0)
    shared, heads = nn.Linear(4, 4), nn.ModuleList(nn.Linear(4, 1) for _ in TASKS)
    h = shared(torch.randn(8, 4))
    losses = {t: head(h).pow(2).mean() + 0.1 for t, head in zip(TASKS, heads, strict=True)}
    return losses, [shared.weight], [*shared.parameters(), *heads.parameters()]


@pytest.mark.parametrize("name", list_balancers())
def test_constructor_is_typed_with_defaults(name):
    params = list(inspect.signature(balancer_class(name).__init__).parameters.values())[1:]
    assert params[0].name == "tasks"
    for p in params[1:]:
        assert p.kind is p.POSITIONAL_OR_KEYWORD, f"{name}: {p.name} must be a plain argument (no *args/**kwargs)"
        assert p.default is not p.empty, f"{name}: {p.name} needs a default"
        assert p.annotation is not p.empty, f"{name}: {p.name} needs a type"


@pytest.mark.parametrize("name", list_balancers("weighting"))
def test_loss_weighting_contract(name):
    balancer = create_balancer(name, TASKS)
    assert isinstance(balancer, LossWeighting)
    for _ in range(3):  # a few steps, so history-based methods leave their warm-up
        losses, shared, params = _task_losses()
        loss = balancer(losses, shared if balancer.needs_shared_params else None)
        assert loss.shape == () and torch.isfinite(loss)
        assert balancer.weights.shape == (3,) and torch.isfinite(balancer.weights).all()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        balancer.after_step({k: v.detach() for k, v in losses.items()})
    _assert_state_round_trips(name, balancer)


@pytest.mark.parametrize("name", list_balancers("aggregator"))
def test_aggregator_contract(name):
    aggregator = create_balancer(name, TASKS)
    assert isinstance(aggregator, GradientAggregator)
    for _ in range(2):
        losses = torch.rand(3) + 0.1 if aggregator.needs_losses else None
        out = aggregator(torch.randn(3, 17), losses)
        assert out.shape == (17,) and torch.isfinite(out).all()
        assert aggregator.weights is None or aggregator.weights.shape == (3,)
    _assert_state_round_trips(name, aggregator)


def _assert_state_round_trips(name, balancer):
    state = balancer.state_dict()
    restored = create_balancer(name, TASKS)
    restored.load_state_dict(state)  # strict: same keys, same shapes
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, state[key])
    clone = copy.deepcopy(balancer)  # e.g. for an EMA copy of the module
    assert clone.tasks == TASKS


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown balancing method 'pcgard'.*pcgrad.*uncertainty"):
        create_balancer("pcgard", TASKS)


@pytest.mark.parametrize("name", list_balancers("weighting"))
def test_wrong_loss_keys_name_the_tasks(name):
    balancer = create_balancer(name, TASKS)
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(1.0), "d": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"missing \['c'\], unexpected \['d'\]"):
        balancer(losses, [torch.zeros(1, requires_grad=True)])


def test_non_scalar_loss_is_rejected():
    with pytest.raises(ValueError, match="task 'b' must be a scalar"):
        create_balancer("equal", ["a", "b"])({"a": torch.tensor(1.0), "b": torch.ones(2)})


def test_fixed_weights_of_the_wrong_length():
    with pytest.raises(ValueError, match="expected 3 weights"):
        create_balancer("fixed", TASKS, weights=[1.0, 2.0])


@pytest.mark.parametrize("tasks", [["a", "a"], []], ids=["duplicate", "empty"])
@pytest.mark.parametrize("name", list_balancers())
def test_duplicate_or_missing_tasks_are_rejected(name, tasks):
    with pytest.raises(ValueError):
        create_balancer(name, tasks)
