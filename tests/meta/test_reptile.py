"""Reptile: the outer update against closed forms, the annealing schedule, bad input, real-data smoke."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_mtl import Episode
from lightning_mtl.meta.reptile import Reptile


def tiny_episode(ways=3, shots=2, queries=2, meta_batch=2, seed=0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(meta_batch, ways * shots, 1, 2, 2, generator=g, dtype=torch.float64)
    qx = torch.randn(meta_batch, ways * queries, 1, 2, 2, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1)
    return Episode(sx, sy, qx, qy, ways)


class Repeat(IterableDataset):
    def __init__(self, episode: Episode):
        self.episode = episode

    def __iter__(self):
        while True:
            yield self.episode


def fit(model: Reptile, episode: Episode, steps: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, precision="64-true", limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(model, DataLoader(Repeat(episode), batch_size=None))
    return trainer


def task_data(episode: Episode, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reptile trains on the support and query sets together."""
    return torch.cat([episode.support_x[i], episode.query_x[i]]), torch.cat([episode.support_y[i], episode.query_y[i]])


def tiny_reptile(backbone: nn.Module | None = None, **kw) -> Reptile:
    torch.manual_seed(0)
    backbone = backbone if backbone is not None else nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh())
    return Reptile(ways=3, backbone=backbone, image_shape=(1, 2, 2), **kw)


def test_one_sgd_step_one_task_is_a_scaled_gradient_step():
    """k = 1, one task: theta + eps (theta - lr grad L(theta) - theta) = theta - eps lr grad L(theta)."""
    eps, lr = 0.7, 0.3
    model = tiny_reptile(inner_optimizer="sgd", inner_lr=lr, inner_steps=1, inner_batch_size=None, outer_lr=eps)
    model = model.double()
    episode = tiny_episode(meta_batch=1)
    theta = [p.detach().clone() for p in model.fast_parameters().values()]
    x, y = task_data(episode, 0)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.fast_parameters().values()))
    fit(model, episode, steps=1)
    for p, t, g in zip(model.fast_parameters().values(), theta, grads, strict=True):
        torch.testing.assert_close(p.detach(), t.detach() - eps * lr * g, atol=1e-14, rtol=1e-12)


class QuadraticReptile(Reptile):
    """Least squares to one-hot targets: the loss is quadratic in (W, b) when the backbone is the identity."""

    def inner_loss(self, logits, y):
        return 0.5 * (logits - F.one_hot(y, logits.shape[-1]).to(logits.dtype)).pow(2).sum(1).mean()


def test_k_sgd_steps_on_a_quadratic_match_the_closed_form():
    """Gradient descent on L(T) = |X T^T - E|^2 / 2n (T = [W b], X = [x 1]) is T_k = T_0 A^k + lr C sum_j A^j with
    A = I - lr X^T X / n and C = E^T X / n; the update is theta + eps (mean_i T_k^i - theta)."""
    eps, lr, k = 0.6, 0.2, 4
    torch.manual_seed(0)
    model = QuadraticReptile(ways=3, backbone=nn.Flatten(), image_shape=(1, 2, 2), inner_optimizer="sgd", inner_lr=lr,
                             inner_steps=k, inner_batch_size=None, outer_lr=eps)
    episode = tiny_episode(meta_batch=2)
    head = model.head
    t0 = torch.cat([head.weight, head.bias[:, None]], 1).detach().double()  # (ways, 5)
    targets = []
    for i in range(2):
        x, y = task_data(episode, i)
        xb = torch.cat([x.reshape(len(x), -1), torch.ones(len(x), 1, dtype=torch.float64)], 1)  # (n, 5)
        a = torch.eye(5, dtype=torch.float64) - lr * xb.T @ xb / len(x)
        c = F.one_hot(y, 3).double().T @ xb / len(x)
        targets.append(t0 @ torch.linalg.matrix_power(a, k) + lr * c @ sum(torch.linalg.matrix_power(a, j)
                                                                            for j in range(k)))
    expected = t0 + eps * (sum(targets) / 2 - t0)
    fit(model, episode, steps=1)
    torch.testing.assert_close(torch.cat([head.weight, head.bias[:, None]], 1).detach(), expected, atol=1e-13, rtol=0)


def test_fresh_adam_first_step_is_lr_times_normalised_gradient():
    """beta1 = 0 and bias correction: the first Adam step is lr g / (|g| + 1e-8), about lr sign(g)."""
    model = tiny_reptile(inner_optimizer="adam", inner_lr=1e-3, inner_batch_size=None, inner_state="fresh").double()
    x, y = task_data(tiny_episode(), 0)
    theta = model.fast_parameters()
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(theta.values()))
    phi, loss, acc = model.adapt_task(x, y, 1, "train", None)
    for (name, p), g in zip(theta.items(), grads, strict=True):
        torch.testing.assert_close(phi[name], p.detach() - 1e-3 * g / (g.abs() + 1e-8), atol=1e-15, rtol=1e-12)
    assert torch.isfinite(loss) and 0 <= acc <= 1


def manual_adam(theta, tasks, steps, lr, beta2, v=None, t=0):
    """beta1 = 0 Adam written out: ``v <- beta2 v + (1 - beta2) g^2``, ``p <- p - lr g / (sqrt(v / (1 - beta2^t)) +
    eps)``, one state ``(v, t)`` continued from task to task, every task starting from ``theta``."""
    v = {n: torch.zeros_like(p) for n, p in theta.items()} if v is None else v
    phis = []
    for model, x, y in tasks:
        params = {n: p.detach().clone() for n, p in theta.items()}
        for _ in range(steps):
            leaves = {n: p.requires_grad_() for n, p in params.items()}
            grads = torch.autograd.grad(F.cross_entropy(model(x, leaves), y), list(leaves.values()))
            t += 1
            for (n, p), g in zip(leaves.items(), grads, strict=True):
                v[n] = beta2 * v[n] + (1 - beta2) * g * g
                params[n] = (p - lr * g / ((v[n] / (1 - beta2**t)).sqrt() + 1e-8)).detach()
        phis.append(params)
    return phis, v, t


def test_carried_adam_state_continues_from_task_to_task_and_evaluation_leaves_it():
    """The paper's code: one inner Adam state through all tasks. Task 2 starts from theta with the moments task 1
    left; evaluation adapts from a copy of the state."""
    model = tiny_reptile(inner_optimizer="adam", inner_lr=1e-2, inner_batch_size=None, inner_state="carried").double()
    episode = tiny_episode()
    tasks = [(model, *task_data(episode, i)) for i in range(2)]
    theta = {n: p.detach().clone() for n, p in model.fast_parameters().items()}
    expected, v, t = manual_adam(theta, tasks, steps=3, lr=1e-2, beta2=0.999)
    for (_, x, y), phi_expected in zip(tasks, expected, strict=True):
        phi, _, _ = model.adapt_task(x, y, 3, "train", None, carry=True)
        for n in theta:
            torch.testing.assert_close(phi[n], phi_expected[n], atol=1e-12, rtol=1e-10)
    state = model.inner_adam_state()
    assert all(s["step"].item() == t == 6 for s in state.values())
    for n in theta:
        torch.testing.assert_close(state[n]["exp_avg_sq"], v[n], atol=1e-15, rtol=1e-10)
    # a third task without carry (evaluation): adapts from the carried state, then leaves it as it was
    before = {k: b.clone() for k, b in model.inner_adam.named_buffers()}
    (phi3_expected,), _, _ = manual_adam(theta, tasks[:1], steps=2, lr=1e-2, beta2=0.999,
                                         v={n: x.clone() for n, x in v.items()}, t=t)
    phi3, _, _ = model.adapt_task(*tasks[0][1:], 2, "train", None)
    for n in theta:
        torch.testing.assert_close(phi3[n], phi3_expected[n], atol=1e-12, rtol=1e-10)
    for k, b in model.inner_adam.named_buffers():
        assert torch.equal(b, before[k]), k


def test_fresh_adam_state_forgets_the_previous_task():
    model = tiny_reptile(inner_optimizer="adam", inner_lr=1e-2, inner_batch_size=None, inner_state="fresh").double()
    episode = tiny_episode()
    theta = {n: p.detach().clone() for n, p in model.fast_parameters().items()}
    model.adapt_task(*task_data(episode, 0), 3, "train", None, carry=True)
    phi, _, _ = model.adapt_task(*task_data(episode, 1), 3, "train", None, carry=True)
    (expected,), _, _ = manual_adam(theta, [(model, *task_data(episode, 1))], steps=3, lr=1e-2, beta2=0.999)
    for n in theta:
        torch.testing.assert_close(phi[n], expected[n], atol=1e-12, rtol=1e-10)
    assert model.inner_adam_state() is None and not list(model.inner_adam.buffers())


def test_training_carries_the_inner_state_in_the_state_dict():
    model = tiny_reptile(inner_optimizer="adam", inner_lr=1e-2, inner_steps=2, inner_batch_size=None)
    fit(model, tiny_episode(meta_batch=2), steps=3)
    state = model.inner_adam_state()
    assert all(s["step"].item() == 3 * 2 * 2 for s in state.values())  # meta-iterations x tasks x inner steps
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in state.values())
    keys = {k for k in model.state_dict() if k.startswith("inner_adam.")}
    assert "inner_adam.step" in keys and "inner_adam.head__weight__exp_avg_sq" in keys
    assert len(keys) == 1 + 2 * len(model.fast_parameters())


def test_inner_mini_batches_pass_over_the_task_without_replacement():
    seen = []

    class Recording(Reptile):
        def inner_loss(self, logits, y):
            seen.append(y.tolist())
            return super().inner_loss(logits, y)

    model = Recording(ways=6, backbone=nn.Flatten(), image_shape=(1, 2, 2), inner_optimizer="sgd", inner_lr=0.1)
    x, y = torch.randn(6, 1, 2, 2), torch.arange(6)  # one example per class: labels identify examples
    model.adapt_task(x, y, 6, "train", 2)
    assert [sorted(sum(seen[i : i + 3], [])) for i in (0, 3)] == [list(range(6))] * 2


def test_outer_step_size_is_annealed_linearly_over_max_steps():
    model = tiny_reptile(outer_lr=0.8, outer_lr_final=0.2)
    assert [model.outer_step_size(t, 4) for t in range(5)] == pytest.approx([0.8, 0.65, 0.5, 0.35, 0.2])
    lrs = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = tiny_reptile(inner_optimizer="sgd", inner_lr=0.1, inner_steps=1, outer_lr=1.0)  # to 0 by default
    fit(model, tiny_episode(), steps=4, callbacks=[RecordLR()])
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ways": 1}, "needs ways >= 2"),
    ({"inner_optimizer": "rmsprop"}, "inner_optimizer must be 'sgd' or 'adam'"),
    ({"inner_state": "shared"}, "inner_state must be 'carried' or 'fresh'"),
    ({"inner_steps": 0}, "need inner_steps >= 1"),
    ({"inner_batch_size": 0}, "inner_batch_size must be >= 1 or None"),
    ({"outer_lr": 0.0}, "outer_lr > 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Reptile(**{"backbone": nn.Flatten(), "image_shape": (1, 2, 2), **kwargs})


def test_mismatched_episodes_and_missing_max_steps_are_refused():
    model = tiny_reptile()
    with pytest.raises(ValueError, match="episodes are 2-way but the Reptile head has 3 outputs"):
        model.episode_logits(tiny_episode(ways=2), "val")
    with pytest.raises(ValueError, match=r"images of shape \(1, 2, 2\) but the head was sized for image_shape"):
        Reptile(ways=3, backbone=nn.Flatten(), image_shape=(1, 3, 3)).episode_logits(tiny_episode(), "val")
    with pytest.raises(ValueError, match="set trainer.max_steps > 0"):
        L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(model, DataLoader(Repeat(tiny_episode()), batch_size=None))


def test_evaluation_adapts_without_touching_the_module():
    model = Reptile(ways=5, eval_inner_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ep = Episode(torch.randint(0, 255, (2, 5, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2, 1),
                 torch.randint(0, 255, (2, 10, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2, 2), 5)
    with torch.inference_mode():
        assert model.episode_logits(ep, "test").shape == (2, 10, 5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_real_omniglot_training_steps(omniglot_root, cache_dir, tmp_path):
    from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes

    dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False,
                          episodes=EpisodeSettings(train_queries=1, meta_batch_size=2, eval_meta_batch_size=4,
                                                   val_episodes=4, test_episodes=4))
    model = Reptile(ways=5, inner_steps=2, eval_inner_steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2 and torch.isfinite(metrics["train/loss"]) and 0 <= metrics["val/acc"] <= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_inner_steps_see_the_updated_weights_under_mixed_precision():
    """Autocast caches low-precision copies of leaf weights for the whole region; the in-place inner updates must
    not be hidden by that cache (else every inner step reuses the copy of theta)."""
    model = tiny_reptile(inner_optimizer="sgd", inner_lr=0.5, inner_steps=3, inner_batch_size=None)
    episode = tiny_episode(meta_batch=1)
    x, y = (t.float() if t.is_floating_point() else t for t in task_data(episode, 0))
    params = {n: p.detach().clone() for n, p in model.fast_parameters().items()}
    for _ in range(3):  # reference: every step in its own autocast region, out-of-place updates
        with torch.autocast("cpu", dtype=torch.bfloat16):
            leaves = {n: p.requires_grad_() for n, p in params.items()}
            loss = F.cross_entropy(model(x, leaves).float(), y)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        params = {n: (p - 0.5 * g).detach() for (n, p), g in zip(leaves.items(), grads, strict=True)}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # one region around the whole inner loop, as Lightning does
        phi, _, _ = model.adapt_task(x, y, 3, "train", None)
    for n, p in params.items():
        torch.testing.assert_close(phi[n], p, atol=1e-6, rtol=1e-5)
