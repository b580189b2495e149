"""The core of the gradient-based meta-learners: one inner loop, the update rule as a method's only part."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.batches import Episode
from lightning_mtl.meta import ANIL, MAML, GradientLearner, LearnedOptimizer, MetaSGD, Reptile


def tiny_episode(ways=3, shots=2, queries=2, meta_batch=2, seed=0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(meta_batch, ways * shots, 1, 2, 2, generator=g, dtype=torch.float64),
                   torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1),
                   torch.randn(meta_batch, ways * queries, 1, 2, 2, generator=g, dtype=torch.float64),
                   torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1), ways)


class SignSGD(GradientLearner):
    """A method written as a user would: only the update rule, ``theta - lr * sign(g)``, with a step counter state."""

    def __init__(self, lr: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lr = lr

    def init_state(self, params, stage):
        return 0

    def update(self, params, grads, loss, state, stage, create_graph):
        return {n: p - self.lr * grads[n].sign() for n, p in params.items()}, state + 1


def backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh())


def test_a_method_is_its_update_rule():
    torch.manual_seed(0)
    model = SignSGD(lr=0.1, ways=3, backbone=backbone(), image_shape=(1, 2, 2), inner_steps=3).double()
    episode = tiny_episode()
    x, y = episode.support_x[0], episode.support_y[0]
    adapted = model.adapt(x, y, 3, "train", create_graph=False)
    assert adapted.state == 3
    expected = {n: p.detach().clone() for n, p in model.fast_parameters().items()}
    for _ in range(3):  # the loop written out
        leaves = {n: p.requires_grad_() for n, p in expected.items()}
        grads = torch.autograd.grad(F.cross_entropy(model(x, leaves), y), list(leaves.values()))
        expected = {n: (p - 0.1 * g.sign()).detach() for (n, p), g in zip(leaves.items(), grads, strict=True)}
    for n in expected:
        torch.testing.assert_close(adapted.params[n], expected[n], atol=1e-14, rtol=0)
    logits = model.episode_logits(episode, "train")  # the episode path and the checks come with the core
    assert logits.shape == (2, 6, 3) and logits.requires_grad
    with torch.inference_mode():  # evaluation adapts with gradients re-enabled
        assert model.episode_logits(episode, "val").shape == (2, 6, 3)


def test_the_core_names_backbone_and_head_and_every_learner_shares_them():
    for cls in (MAML, ANIL, MetaSGD, LearnedOptimizer, Reptile):
        model = cls(ways=4, backbone=backbone(), image_shape=(1, 2, 2))
        assert isinstance(model, GradientLearner) and model.head.out_features == 4
        children = [n for n, _ in model.named_children() if n not in ("episode_accs", "episode_families")]
        assert children[:2] == ["backbone", "head"], cls
    assert list(ANIL(ways=3, backbone=backbone(), image_shape=(1, 2, 2)).fast_parameters()) == [
        "head.weight", "head.bias"]


def test_methods_without_a_scalar_step_size_do_not_carry_one():
    for cls in (MetaSGD, LearnedOptimizer):
        model = cls(ways=3, backbone=backbone(), image_shape=(1, 2, 2))
        assert "inner_lr" not in model.hparams and "eval_inner_lr" not in model.hparams, cls
        with pytest.raises(TypeError, match="no scalar inner step size"):
            model.inner_lr("train")


def test_checkpoints_of_the_old_layout_load():
    """Before the core, the network was ``net = Sequential(backbone, Flatten, Linear)`` and Reptile's carried Adam
    buffers were named after ``net``'s parameters: such state dicts load into ``backbone`` / ``head``."""
    torch.manual_seed(0)
    source = Reptile(ways=3, backbone=backbone(), image_shape=(1, 2, 2))
    for buffer in source.inner_adam.buffers():
        buffer.normal_()
    old = {}
    for key, value in source.state_dict().items():
        key = key.replace("backbone.", "net.0.", 1).replace("head.", "net.2.", 1)
        key = key.replace("inner_adam.backbone__", "inner_adam.0__").replace("inner_adam.head__", "inner_adam.2__")
        old[key] = value
    assert any(k.startswith("net.2.") for k in old) and any(k.startswith("inner_adam.0__") for k in old)
    target = Reptile(ways=3, backbone=backbone(), image_shape=(1, 2, 2))
    target.load_state_dict(old)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_an_override_of_the_old_inner_loss_name_is_refused():
    with pytest.raises(TypeError, match="now `inner_loss"):
        type("Old", (Reptile,), {"task_loss": lambda self, logits, y: logits.sum()})


@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD, LearnedOptimizer])
def test_vmapped_meta_batch_equals_the_loop(cls):
    """All tasks of a meta-batch adapted in one torch.func.vmap: the query logits (evaluation, and first-order
    training) and the first-order meta-gradient equal the loop's; second-order training keeps the loop."""
    from lightning_mtl.nn import Conv4

    g = torch.Generator().manual_seed(0)
    episode = Episode(torch.randn(3, 5, 1, 28, 28, generator=g, dtype=torch.float64),
                      torch.arange(5).expand(3, -1).clone(),
                      torch.randn(3, 10, 1, 28, 28, generator=g, dtype=torch.float64),
                      torch.arange(5).repeat_interleave(2).expand(3, -1).clone(), 5)
    torch.manual_seed(0)
    model = cls(ways=5, backbone=Conv4(hidden_channels=8, out_channels=8, track_running_stats=False),
                image_shape=(1, 28, 28), inner_steps=2, first_order=True).double()
    results = {}
    for mode in ("loop", "vmap"):
        model.vectorize = mode
        logits = model.episode_logits(episode, "train")
        grads = torch.autograd.grad(logits.pow(2).sum(), list(model.parameters()), allow_unused=True)
        with torch.inference_mode():
            evaluation = model.episode_logits(episode, "val")
        results[mode] = (logits.detach(), grads, evaluation)
    (a, ga, ea), (b, gb, eb) = results["loop"], results["vmap"]
    torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(eb, ea, atol=1e-10, rtol=1e-8)
    for x, y in zip(ga, gb, strict=True):
        if x is not None:
            torch.testing.assert_close(y, x, atol=1e-10, rtol=1e-8)
    model.first_order, model.vectorize = False, "vmap"
    assert not model._vectorized(episode.support_x, "train") and model._vectorized(episode.support_x, "val")
