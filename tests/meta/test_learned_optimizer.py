"""The learned update rule (Ravi & Larochelle's meta-learner LSTM): preprocessing, the update formula, the
meta-gradient against finite differences, and training on real Omniglot."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.meta.learned_optimizer import LearnedOptimizer, MetaLearnerLSTM, preprocess


def test_preprocessing_of_large_and_small_values():
    x = torch.tensor([2.0, -math.exp(-3.0), 1e-6, -1e-7, 0.0])
    out = preprocess(x, p=10.0)
    torch.testing.assert_close(out[0], torch.tensor([math.log(2.0) / 10, 1.0]))
    torch.testing.assert_close(out[1], torch.tensor([-0.3, -1.0]))
    torch.testing.assert_close(out[2], torch.tensor([-1.0, 1e-6 * math.exp(10)]))
    torch.testing.assert_close(out[3], torch.tensor([-1.0, -1e-7 * math.exp(10)]))
    torch.testing.assert_close(out[4], torch.tensor([-1.0, 0.0]))


def test_update_is_forget_times_theta_minus_input_times_grad():
    rule = MetaLearnerLSTM(input_bias=-2.0, forget_bias=3.0)
    nn.init.zeros_(rule.input_gate.weight)
    nn.init.zeros_(rule.forget_gate.weight)  # gates are then their biases' sigmoids, whatever the inputs
    theta, grad = torch.randn(3, 4), torch.randn(3, 4)
    new, i, f = rule(theta, grad, torch.tensor(0.7), *rule.initial_gates(theta))
    s = torch.sigmoid
    torch.testing.assert_close(new, s(torch.tensor(3.0)) * theta - s(torch.tensor(-2.0)) * grad)
    assert i.shape == f.shape == theta.shape


def _tiny(first_order: bool, steps: int) -> LearnedOptimizer:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh())
    return LearnedOptimizer(ways=2, backbone=backbone, image_shape=(1, 2, 2), inner_steps=steps,
                            first_order=first_order).double()


# second order: the exact gradient of every parameter through two learned updates. First order treats the learner's
# gradient as a constant, which is exact only for the rule's own parameters after a single update (the gradient at
# theta_0 does not depend on them).
@pytest.mark.parametrize(("first_order", "steps", "only_rule"), [(False, 2, False), (True, 1, True)])
def test_meta_gradient_matches_finite_differences(first_order, steps, only_rule):
    model = _tiny(first_order, steps)
    with torch.no_grad():  # larger gate weights, so that every term of the rule matters
        for gate in (model.update_rule.input_gate, model.update_rule.forget_gate):
            gate.weight.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    ep = Episode(torch.randn(1, 4, 1, 2, 2, generator=g, dtype=torch.float64), torch.tensor([[0, 1, 0, 1]]),
                 torch.randn(1, 6, 1, 2, 2, generator=g, dtype=torch.float64), torch.tensor([[0, 1, 0, 1, 0, 1]]), 2)

    def meta_loss() -> torch.Tensor:
        logits = model.episode_logits(ep, "train")
        return nn.functional.cross_entropy(logits.flatten(0, 1), ep.query_y.flatten())

    params = list(model.update_rule.parameters() if only_rule else model.parameters())
    grads = torch.autograd.grad(meta_loss(), params)
    eps = 1e-6
    for p, gp in zip(params, grads, strict=True):
        for idx in [tuple(int(torch.randint(s, (1,), generator=g)) for s in p.shape) for _ in range(3)]:
            p.data[idx] += eps  # .data: the inner loop needs autograd, so no torch.no_grad() here
            up = meta_loss().item()
            p.data[idx] -= 2 * eps
            down = meta_loss().item()
            p.data[idx] += eps
            assert gp[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-7)


def test_rule_parameters_get_gradients_and_eval_adapts(omniglot_root, cache_dir, monkeypatch):
    from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes

    monkeypatch.setenv("LIGHTNING_MTL_CACHE", str(cache_dir))
    dm = OmniglotEpisodes(root=omniglot_root, episodes=EpisodeSettings(
        train_ways=5, train_shots=1, train_queries=5, val_episodes=4, eval_queries=5, meta_batch_size=2))
    dm.prepare_data()
    dm.setup("fit")
    model = LearnedOptimizer(ways=5, inner_steps=2, eval_inner_steps=3)
    batch = next(iter(dm.train_dataloader()))
    loss, accs = model._step(batch, "train")
    loss.backward()
    assert torch.isfinite(loss) and accs.shape == (2,)
    for p in model.update_rule.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with torch.no_grad():
        val_logits = model.episode_logits(next(iter(dm.val_dataloader())), "val")
    assert val_logits.shape[-1] == 5 and torch.isfinite(val_logits).all()
