"""Outer-loop balancing: a multi-task gradient aggregator over the per-episode outer gradients of a meta-batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl.batches import Episode
from lightning_mtl.meta import MAML, ProtoNet, Reptile, SiameseNetwork
from lightning_mtl.mtl.balancing import create_balancer


def episodes(steps=1, meta_batch=3, ways=3, shots=2, queries=2, seed=0) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append(Episode(torch.randn(meta_batch, ways * shots, 1, 4, 4, generator=g, dtype=torch.float64),
                           torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1).clone(),
                           torch.randn(meta_batch, ways * queries, 1, 4, 4, generator=g, dtype=torch.float64),
                           torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1).clone(), ways))
    return out


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh())


def make(kind: str, **kw) -> L.LightningModule:
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    if kind == "protonet":
        model = ProtoNet(backbone=backbone(), optimizer=sgd, **kw)
    elif kind == "maml":
        model = MAML(ways=3, backbone=backbone(), image_shape=(1, 4, 4), inner_lr=0.3, optimizer=sgd, **kw)
    elif kind == "siamese":
        model = SiameseNetwork(backbone=backbone(), image_shape=(1, 4, 4), pairs="all", optimizer=sgd, **kw)
    else:
        model = Reptile(ways=3, backbone=backbone(), image_shape=(1, 4, 4), inner_optimizer="sgd", inner_lr=0.1,
                        inner_steps=2, inner_batch_size=None, outer_lr=0.5, **kw)
    return model.double()


def fit(model: L.LightningModule, data: list[Episode], **kw) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(data), max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, **kw)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))
    return trainer


def parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def per_episode_matrix(model, episode: Episode) -> torch.Tensor:
    """Rows: the gradient of each episode's loss alone (the model's default path on a one-episode meta-batch)."""
    rows = []
    for i in range(episode.meta_batch_size):
        one = Episode(*(t[i : i + 1] for t in episode[:4]), episode.ways)
        model.zero_grad()
        loss, _ = model._step(one, "train")
        loss.backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["protonet", "maml", "siamese", "reptile"])
def test_the_mean_aggregator_is_the_usual_update(kind):
    """meta_balancer="mean" (torchjd's Mean over the episode rows) trains as no balancer (up to the float32 rounding
    of torchjd's weights 1/B)."""
    data = episodes(steps=2)
    plain, mean = make(kind), make(kind, meta_balancer="mean")
    fit(plain, data)
    fit(mean, data)
    torch.testing.assert_close(parameters(mean), parameters(plain), atol=1e-7, rtol=1e-6)
    assert not torch.equal(parameters(plain), parameters(make(kind)))


@pytest.mark.parametrize(("kind", "method"), [("protonet", "pcgrad"), ("maml", "upgrad"), ("maml", "mgda")])
def test_the_update_is_the_aggregation_of_the_per_episode_gradients(kind, method):
    """One SGD step with meta_balancer=method moves the parameters by -lr * method(J), J the per-episode gradient
    matrix computed one episode at a time."""
    episode = episodes(steps=1)[0]
    model = make(kind, meta_balancer=method)
    before = parameters(model)
    matrix = per_episode_matrix(make(kind), episode)
    torch.manual_seed(0)
    expected = create_balancer(method, [f"episode{i}" for i in range(3)])(matrix)
    torch.manual_seed(0)
    fit(model, [episode])
    torch.testing.assert_close(parameters(model), before - 0.1 * expected, atol=1e-6, rtol=1e-5)


def test_reptile_aggregates_the_task_directions():
    """Reptile's outer update with meta_balancer: SGD(outer_lr) on method(theta - phi_i) over the tasks."""
    episode = episodes(steps=1, meta_batch=2)[0]
    model = make("reptile", meta_balancer="mgda")
    reference = make("reptile")
    theta = {n: p.detach().clone() for n, p in reference.fast_parameters().items()}
    x, y = torch.cat([episode.support_x, episode.query_x], 1), torch.cat([episode.support_y, episode.query_y], 1)
    rows = []
    for i in range(2):
        phi, _, _ = reference.adapt_task(x[i], y[i], 2, "train", None)
        rows.append(torch.cat([(theta[n] - phi[n]).flatten() for n in theta]))
    direction = create_balancer("mgda", ["episode0", "episode1"])(torch.stack(rows))
    fit(model, [episode])
    after = torch.cat([p.detach().flatten() for p in model.fast_parameters().values()])
    before = torch.cat([t.flatten() for t in theta.values()])
    torch.testing.assert_close(after, before - 0.5 * direction, atol=1e-6, rtol=1e-5)


def test_episode_gradient_conflict_is_logged():
    model = make("protonet", meta_balancer="upgrad", diagnostics_every=1)
    trainer = fit(model, episodes(steps=2))
    metrics = trainer.callback_metrics
    assert {"diag/cos_mean", "diag/conflict_frac", "diag/grad_norm_ratio/episode0",
            "diag/cos/episode0|episode2"} <= set(metrics)
    assert -1 <= float(metrics["diag/cos_mean"]) <= 1


def test_a_loss_weighting_or_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown balancing method 'pcgradd'"):
        make("protonet", meta_balancer="pcgradd")
    with pytest.raises(ValueError, match="meta_balancer must be a gradient aggregator .* UncertaintyWeighting"):
        fit(make("protonet", meta_balancer="uncertainty"), episodes())


def test_a_stateful_aggregator_is_checkpointed_and_restored(tmp_path):
    """The balancer is built for the meta-batch size before the first step and its state rides in checkpoints:
    `load_from_checkpoint` rebuilds it before loading the state dict."""
    model = make("protonet", meta_balancer="nash_mtl")
    trainer = fit(model, episodes(steps=2))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ProtoNet.load_from_checkpoint(tmp_path / "m.ckpt", backbone=backbone(), weights_only=False)
    assert len(loaded.meta_balancer.tasks) == 3
    for (k, v), (k2, v2) in zip(model.meta_balancer.state_dict().items(), loaded.meta_balancer.state_dict().items(),
                                strict=True):
        assert k == k2 and torch.equal(v.cpu(), v2.cpu().to(v.dtype)), k


def test_maml_episode_losses_have_graphs_of_their_own():
    """Each episode's outer gradient walks only that episode's graph: a loss taken out of a stacked tensor would send
    zero gradients through every other episode's second-order graph (measured 5x the step time at meta-batch 8)."""
    model, episode = make("maml"), episodes(meta_batch=3)[0]
    terms, accs = model.episode_loss_terms(episode, "train")
    assert len(terms) == 3 and accs.shape == (3,)
    reached = []
    for term in terms:
        seen, stack = set(), [term.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack += [next_node for next_node, _ in node.next_functions]
        reached.append(seen)
        assert not any(type(node).__name__.startswith(("Stack", "Unbind")) for node in seen)
    assert not (reached[0] & reached[1]) - {n for n in reached[0] if type(n).__name__ == "AccumulateGrad"}
    losses, _ = model.episode_losses(episode, "train")
    torch.testing.assert_close(torch.stack([t.detach() for t in terms]), losses.detach())
