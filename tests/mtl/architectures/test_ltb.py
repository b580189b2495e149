from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lightning_mtl.mtl.architectures.ltb import LTB
from lightning_mtl.nn import Conv4

TASKS = ["a", "b", "c"]


def mlp(*widths: int) -> nn.Sequential:
    """An nn.Sequential of Linear+ReLU stages."""
    return nn.Sequential(*(nn.Sequential(nn.Linear(i, o), nn.ReLU()) for i, o in itertools.pairwise(widths)))


def model_with_random_logits(seed: int = 0, **kwargs) -> LTB:
    torch.manual_seed(seed)
    model = LTB(TASKS, mlp(4, 5, 5, 3), widths=[2, 3], **kwargs)
    with torch.no_grad():
        for p in model.logits.parameters():
            p.copy_(torch.randn_like(p))
    return model


def force(model: LTB, parents: list[list[int]]) -> None:
    """Logits that make every child pick the given parent whatever the Gumbel noise (noise lies in about [-5, 17])."""
    with torch.no_grad():
        for layer, chosen in zip(model.logits, parents, strict=True):
            for theta, j in zip(layer, chosen, strict=True):
                theta.fill_(0.0)
                theta[j] = 50.0


def along(model: LTB, path: list[int], x: torch.Tensor) -> torch.Tensor:
    """The hard-sharing network of one root-to-leaf path: its nodes applied in sequence."""
    return nn.Sequential(*(model.nodes[depth][j] for depth, j in enumerate(path)))(x)


def test_probabilities_are_a_softmax_of_the_logits():
    model = model_with_random_logits()
    probs = model.probabilities()
    assert [p.shape for p in probs] == [(3, 2), (3, 3)]  # (children, parents) per branching layer
    for p, layer in zip(probs, model.logits, strict=True):
        torch.testing.assert_close(p, torch.softmax(torch.stack(list(layer)), dim=-1))
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]))


def test_eval_is_the_deterministic_argmax_tree():
    model = model_with_random_logits().eval()
    parents = model.parents()
    assert parents == [torch.stack(list(layer)).argmax(-1).tolist() for layer in model.logits]
    x = torch.randn(6, 4)
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    second = model(x)
    for k, t in enumerate(TASKS):
        path = model.paths()[t]
        assert path[-1] == k and path[1] == parents[1][k] and path[0] == parents[0][path[1]]
        torch.testing.assert_close(first[t], second[t], rtol=0, atol=0)
        torch.testing.assert_close(first[t], along(model, path, x), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_forced_parents_equal_hard_sharing_on_the_chosen_path(training):
    model = model_with_random_logits().train(training)
    force(model, [[0, 0, 0], [0, 0, 0]])  # one trunk (node 0, node 0), then the task leaves: hard sharing
    assert model.paths() == {"a": [0, 0, 0], "b": [0, 0, 1], "c": [0, 0, 2]}
    x = torch.randn(6, 4)
    trunk = along(model, [0, 0], x)
    out = model(x)
    for k, t in enumerate(TASKS):
        torch.testing.assert_close(out[t], model.nodes[-1][k](trunk), rtol=0, atol=0)
    force(model, [[1, 0, 1], [2, 0, 1]])  # a branched tree: a and b share the root node 1, c branches at the root
    expected = {"a": [1, 2, 0], "b": [1, 0, 1], "c": [0, 1, 2]}
    assert model.paths() == expected
    out = model(x)
    for t, path in expected.items():
        torch.testing.assert_close(out[t], along(model, path, x), rtol=0, atol=0)


def test_straight_through_forward_is_one_discrete_tree():
    model = model_with_random_logits()
    x = torch.randn(6, 4)
    for _ in range(5):
        out = model(x)
        for k, t in enumerate(TASKS):  # exactly one of the root-to-leaf paths of its leaf
            candidates = [along(model, [i, j, k], x) for i, j in itertools.product(range(2), range(3))]
            assert sum(torch.equal(out[t], c) for c in candidates) >= 1


@pytest.mark.parametrize("straight_through", [True, False])
def test_gradients_reach_the_branching_logits_in_training(straight_through):
    model = model_with_random_logits(straight_through=straight_through)
    sum(o.square().sum() for o in model(torch.randn(6, 4)).values()).backward()
    norms = [[theta.grad.abs().sum().item() for theta in layer] for layer in model.logits]
    assert all(n > 0 for n in norms[-1])  # every leaf's logits
    if straight_through:  # the children on the sampled tree (at least one per layer)
        assert any(n > 0 for n in norms[0])
    else:  # the relaxed mixture reaches every child
        assert all(n > 0 for n in norms[0])


def test_identical_copies_give_no_logit_gradient():
    """Why nodes are re-drawn by default: identical parents have identical outputs, so the choice cannot matter."""
    torch.manual_seed(0)
    model = LTB(TASKS, mlp(4, 5, 5, 3), independent_init=False)
    sum(o.square().sum() for o in model(torch.randn(6, 4)).values()).backward()
    for theta in model.logits.parameters():
        torch.testing.assert_close(theta.grad, torch.zeros_like(theta), rtol=0, atol=1e-6)


def test_reproducible_under_manual_seed():
    model = model_with_random_logits()
    x = torch.randn(6, 4)

    def draws(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [torch.cat(list(model(x).values()), dim=1) for _ in range(4)]

    first, again, other = draws(0), draws(0), draws(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_each_node_runs_at_most_once_per_forward():
    model = model_with_random_logits()
    calls = {}
    for depth, layer in enumerate(model.nodes):
        for j, node in enumerate(layer):
            calls[(depth, j)] = 0
            node.register_forward_hook(lambda *_, key=(depth, j): calls.__setitem__(key, calls[key] + 1))
    x = torch.randn(2, 4)
    model(x)  # training: every node once
    assert set(calls.values()) == {1}
    calls.update(dict.fromkeys(calls, 0))
    model.represent(x, ["b"])  # training: every inner node (candidate parents), one leaf
    assert calls == {key: int(key[0] < 2 or key[1] == 1) for key in calls}
    calls.update(dict.fromkeys(calls, 0))
    force(model, [[0, 0, 0], [0, 0, 0]])
    model.eval()(x)  # evaluation: only the shared trunk and the leaves, each once
    assert calls == {key: int(key[1] == 0 or key[0] == 2) for key in calls}


def test_parameter_partition_and_task_gradients():
    model = model_with_random_logits(straight_through=False)
    own = model.task_parameters()
    ids = [id(p) for p in model.shared_parameters()] + [id(p) for t in TASKS for p in own[t]]
    assert len(ids) == len(set(ids))  # disjoint
    assert set(ids) == {id(p) for p in model.parameters()}  # and complete
    for k, t in enumerate(TASKS):  # a task owns its leaf and the leaf's branching logits
        assert {id(p) for p in own[t]} == {id(p) for p in model.nodes[-1][k].parameters()} | {id(model.logits[-1][k])}
    x = torch.randn(6, 4)
    for t in TASKS:
        model.zero_grad()
        model(x)[t].square().sum().backward()
        for other in TASKS:
            norms = [0.0 if p.grad is None else p.grad.abs().sum().item() for p in own[other]]
            assert all(n > 0 for n in norms) if other == t else all(n == 0 for n in norms)


def test_temperature_anneals_per_training_sample():
    model = LTB(TASKS, mlp(4, 5, 3), temperature=2.0, min_temperature=0.5, anneal_rate=0.5)
    x = torch.randn(2, 4)
    for n in range(1, 5):
        model(x)
        assert model.temperature.item() == pytest.approx(max(0.5, 2.0 * math.exp(-0.5 * n)), rel=1e-6)
    model.eval()(x)
    assert model.temperature.item() == 0.5
    model.set_temperature(3.0)
    assert model.temperature.item() == 3.0
    with pytest.raises(ValueError, match="temperature"):
        model.set_temperature(0.0)


def test_per_task_inputs():
    model = model_with_random_logits().eval()
    xa, xb = torch.randn(2, 4), torch.randn(5, 4)
    out = model({"a": xa, "b": xb})
    torch.testing.assert_close(out["a"], model.represent(xa, ["a"])["a"])
    torch.testing.assert_close(out["b"], model.represent(xb, ["b"])["b"])


def test_conv4_stages():
    torch.manual_seed(0)
    model = LTB(["a", "b"], Conv4(in_channels=1, hidden_channels=8, out_channels=8), widths=[1, 2, 2])
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert {t: o.shape for t, o in out.items()} == {"a": (3, 8, 1, 1), "b": (3, 8, 1, 1)}
    sum(o.square().sum() for o in out.values()).backward()
    assert all(theta.grad is not None for theta in model.logits.parameters())
    model.eval()
    assert all(path[0] == 0 for path in model.paths().values())  # one root node: the first stage is shared
    torch.testing.assert_close(model(x)["b"], along(model, model.paths()["b"], x))


@pytest.mark.parametrize(("backbone", "kwargs", "error", "match"), [
    (mlp(2, 2), {}, ValueError, "two stages"),
    (nn.Linear(2, 2), {}, TypeError, "stages"),
    (mlp(2, 2, 2, 2), {"widths": [2]}, ValueError, "widths"),
    (mlp(2, 2, 2), {"widths": [0]}, ValueError, "widths"),
    (mlp(2, 2, 2), {"temperature": 0.0}, ValueError, "temperature"),
    (mlp(2, 2, 2), {"min_temperature": -1.0}, ValueError, "min_temperature"),
    (mlp(2, 2, 2), {"temperature": 1.0, "min_temperature": 2.0, "anneal_rate": 0.1}, ValueError, "min_temperature"),
    (mlp(2, 2, 2), {"anneal_rate": -1.0}, ValueError, "anneal_rate"),
])
def test_bad_arguments(backbone, kwargs, error, match):
    with pytest.raises(error, match=match):
        LTB(["a", "b"], backbone, **kwargs)
