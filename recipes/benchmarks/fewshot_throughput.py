"""Few-shot throughput: our Lightning modules vs a raw PyTorch loop of the same math and vs learn2learn, and the
episode sampler.

    python recipes/benchmarks/fewshot_throughput.py                     # CPU, fp32 and bf16-mixed
    python recipes/benchmarks/fewshot_throughput.py --accelerator cuda --precision bf16-mixed 16-mixed 32

All loops consume the same pre-drawn Omniglot episodes (real data from $LIGHTNING_MTL_DATA, else random images), the
same Conv-4 initialisation, optimizer and precision; timing starts after ``--warmup`` steps. The runs alternate
``--repeats`` times and the median step time of each is reported, with the ratio ours / raw loop and the speed-up
over learn2learn (learn2learn ms / ours ms) when it is installed (``make learn2learn``):

* ProtoNet: learn2learn's ``LightningPrototypicalNetworks`` in its own Trainer (``pytorch_lightning``), fed the same
  episodes in its ``(data, labels)`` layout (images already float, which spares it our on-device conversion);
* the peers' Conv-4 (``--l2l-layout``): ``l2l`` (the default) is learn2learn's own ``CNN4Backbone(max_pool=True)``,
  the same function as ours (4 x [conv 3x3, BatchNorm, ReLU, max-pool 2x2], 64 channels) written as plain NCHW
  modules: what a learn2learn user runs. ``same`` gives the peers our Conv-4 exactly (the same kernels, so the ratio
  measures only the framework code); ``nchw`` gives them our Conv-4 with ``channels_last=False``;
* MAML: learn2learn's ``MAML`` with ``clone()`` / ``adapt()`` in the plain loop of its examples (its Lightning MAML
  is written for Lightning 1.x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_mtl import Episode
from lightning_mtl.callbacks import StepTimer
from lightning_mtl.datamodules import EpisodeSampler, EpisodeStream, OmniglotEpisodes
from lightning_mtl.meta import MAML, ProtoNet, prototypes, squared_euclidean_logits
from lightning_mtl.nn import Conv4


def class_images(n_classes: int = 4112) -> tuple[np.ndarray, str]:
    try:
        dm = OmniglotEpisodes(download=False)
        dm.prepare_data()
        dm.setup("fit")
        return dm.samplers["train"].images, "Omniglot vinyals/train"
    except (FileNotFoundError, ValueError) as e:
        print(f"[no Omniglot ({str(e).splitlines()[0]}); using random images]")
        return np.random.default_rng(0).integers(0, 256, (n_classes, 20, 1, 28, 28), dtype=np.uint8), "random"


class Episodes(Dataset):
    def __init__(self, episodes: list[Episode]) -> None:
        self.episodes = episodes

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> Episode:
        return self.episodes[i]


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- raw loops (the same math, no framework)
def raw_protonet_step(net, opt, scaler, ep: Episode, device, precision) -> None:
    b, n_support = ep.support_y.shape
    sx, sy = ep.support_x.to(device, non_blocking=True), ep.support_y.to(device, non_blocking=True)
    qx, qy = ep.query_x.to(device, non_blocking=True), ep.query_y.to(device, non_blocking=True)
    with autocast(device, precision):
        z = net(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)]).float().div_(255)).flatten(1)
        support, query = z[: b * n_support].view(b, n_support, -1), z[b * n_support :].view(b, -1, z.shape[-1])
        logits = squared_euclidean_logits(query.float(), prototypes(support.float(), sy, ep.ways))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), qy.flatten())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def raw_maml_step(model: MAML, opt, scaler, ep: Episode, device, precision) -> None:
    hp = model.hparams
    sx, sy = ep.support_x.to(device, non_blocking=True), ep.support_y.to(device, non_blocking=True)
    qx, qy = ep.query_x.to(device, non_blocking=True), ep.query_y.to(device, non_blocking=True)
    with autocast(device, precision):
        logits = []
        net = nn.Sequential(model.backbone, nn.Flatten(), model.head)  # the same parameters, a plain module
        for i in range(sx.shape[0]):
            params = dict(net.named_parameters())
            for _ in range(hp.inner_steps):
                inner = F.cross_entropy(torch.func.functional_call(net, params, (sx[i].float() / 255,)), sy[i])
                grads = torch.autograd.grad(inner, list(params.values()), create_graph=not hp.first_order)
                params = {n: p - hp.inner_lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
            logits.append(torch.func.functional_call(net, params, (qx[i].float() / 255,)))
    loss = F.cross_entropy(torch.stack(logits).flatten(0, 1).float(), qy.flatten())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def time_raw(make_model, step_fn, episodes, device, precision, warmup) -> float:
    torch.manual_seed(0)
    model = make_model().to(device)
    net = model.backbone if isinstance(model, ProtoNet) else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    model.train()
    for i, ep in enumerate(episodes):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        step_fn(net, opt, scaler, ep, device, precision)
    sync(device)
    return (time.perf_counter() - start) / (len(episodes) - warmup)


def time_lightning(make_model, episodes, accelerator, precision, warmup) -> float:
    torch.manual_seed(0)
    model = make_model()
    model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-3)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=len(episodes), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    loader = DataLoader(Episodes(episodes), batch_size=None, shuffle=False, pin_memory=accelerator == "cuda")
    trainer.fit(model, train_dataloaders=loader)
    return timer.seconds_per_step


# ---------------------------------------------------------------- learn2learn, the peer
def l2l_batch(ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """One episode in learn2learn's task layout: ``(1, N, C, H, W)`` float images and ``(1, N)`` labels."""
    return (torch.cat([ep.support_x[0], ep.query_x[0]]).float().div_(255).unsqueeze(0),
            torch.cat([ep.support_y[0], ep.query_y[0]]).unsqueeze(0))


def l2l_backbone(layout: str, transductive: bool) -> torch.nn.Module:
    """The peer's Conv-4: learn2learn's own (``l2l``), ours exactly (``same``), or ours in NCHW layout (``nchw``)."""
    if layout == "l2l":
        from learn2learn.vision.models import CNN4Backbone

        # In training mode its BatchNorm normalises with batch statistics, as ours does (it also updates running
        # statistics, which it never uses while training).
        return CNN4Backbone(hidden_size=64, layers=4, channels=1, max_pool=True)
    return Conv4(in_channels=1, track_running_stats=not transductive, channels_last=layout == "same")


def time_l2l_protonet(episodes, accelerator, precision, warmup, layout="same") -> float:
    import pytorch_lightning as pl
    from learn2learn.algorithms import LightningPrototypicalNetworks

    class PLStepTimer(StepTimer, pl.Callback):  # the same timer, registered with pytorch_lightning's Trainer
        pass

    torch.manual_seed(0)
    ep = episodes[0]
    model = LightningPrototypicalNetworks(l2l_backbone(layout, False), train_ways=ep.ways, train_shots=ep.shots,
                                          train_queries=ep.queries, lr=1e-3)
    timer = PLStepTimer(warmup)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=len(episodes), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    batches = [l2l_batch(e) for e in episodes]
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None, pin_memory=accelerator == "cuda"))
    return timer.seconds_per_step


def time_l2l_maml(episodes, device, precision, warmup, layout="same") -> float:
    import learn2learn as l2l

    torch.manual_seed(0)
    model = MAML(ways=episodes[0].ways, backbone=l2l_backbone(layout, True))
    hp = model.hparams
    net = nn.Sequential(model.backbone, nn.Flatten(), model.head)  # the same parameters, as l2l wraps them
    maml = l2l.algorithms.MAML(net, lr=hp.inner_lr, first_order=hp.first_order).to(device)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    for i, ep in enumerate(episodes):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        sx, sy = ep.support_x.to(device, non_blocking=True), ep.support_y.to(device, non_blocking=True)
        qx, qy = ep.query_x.to(device, non_blocking=True), ep.query_y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            losses = []
            for t in range(sx.shape[0]):
                learner = maml.clone()
                for _ in range(hp.inner_steps):
                    learner.adapt(F.cross_entropy(learner(sx[t].float() / 255), sy[t]))
                losses.append(F.cross_entropy(learner(qx[t].float() / 255).float(), qy[t]))
            loss = torch.stack(losses).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sync(device)
    return (time.perf_counter() - start) / (len(episodes) - warmup)


def learn2learn_available() -> bool:
    try:
        import learn2learn  # noqa: F401
        import pytorch_lightning  # noqa: F401
    except ImportError as e:
        print(f"[learn2learn peer skipped: {e}; run `make learn2learn`]")
        return False
    return True


def sampler_rate(images: np.ndarray, n: int = 20000) -> float:
    stream = iter(EpisodeStream(EpisodeSampler(images, 5, 1, 15), seed=0))
    next(stream)
    start = time.perf_counter()
    for _ in range(n):
        next(stream)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=60, help="steps per timed run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["protonet", "maml"], choices=["protonet", "maml"])
    parser.add_argument("--no-learn2learn", action="store_true", help="skip the learn2learn peer")
    parser.add_argument("--l2l-layout", default="l2l", choices=["l2l", "same", "nchw"],
                        help="the peers' Conv-4: learn2learn's CNN4Backbone(max_pool=True), ours exactly "
                             "(channels-last), or ours in NCHW layout")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    peer = not args.no_learn2learn and learn2learn_available()
    device = torch.device(args.accelerator)

    images, source = class_images()
    rate = sampler_rate(images)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; lightning {L.__version__}; data: {source}")
    print(f"episode sampler, 5-way 1-shot 15-query, one process: {rate:,.0f} episodes/s")

    settings = {
        "protonet": (lambda: ProtoNet(), EpisodeSampler(images, 60, 1, 5, 1), raw_protonet_step,
                     "ProtoNet 60-way 1-shot 5-query"),
        "maml": (lambda: MAML(ways=5), EpisodeSampler(images, 5, 1, 15, 4), raw_maml_step,
                 "MAML 2nd order 5-way 1-shot 15-query, meta-batch 4"),
    }
    if peer:
        print(f"learn2learn peers' Conv-4: --l2l-layout {args.l2l_layout}")
    results = {"device": device_name, "sampler_episodes_per_s": rate, "l2l_layout": args.l2l_layout, "runs": []}
    print(f"{'method':52s} {'precision':>10s} {'raw ms':>8s} {'lightning ms':>12s} {'ratio':>6s} {'episodes/s':>10s}"
          f" {'l2l ms':>8s} {'l2l/ours':>8s}")
    for method in args.methods:
        make_model, sampler, raw_step, label = settings[method]
        rngs = np.random.SeedSequence(1).spawn(args.steps)
        episodes = [sampler.episode([np.random.default_rng(s)]) if sampler.meta_batch_size == 1 else
                    sampler.episode([np.random.default_rng(c) for c in s.spawn(sampler.meta_batch_size)])
                    for s in rngs]
        for precision in args.precision:
            loops = ("raw", "lightning", "learn2learn") if peer else ("raw", "lightning")
            times: dict[str, list[float]] = {loop: [] for loop in loops}
            for r in range(args.repeats):  # alternate the order, so that drift favours no loop
                for loop in loops if r % 2 == 0 else loops[::-1]:
                    if loop == "raw":
                        t = time_raw(make_model, raw_step, episodes, device, precision, args.warmup)
                    elif loop == "lightning":
                        t = time_lightning(make_model, episodes, args.accelerator, precision, args.warmup)
                    elif method == "protonet":
                        t = time_l2l_protonet(episodes, args.accelerator, precision, args.warmup, args.l2l_layout)
                    else:
                        t = time_l2l_maml(episodes, device, precision, args.warmup, args.l2l_layout)
                    times[loop].append(t)
            raw_t, light_t = times["raw"], times["lightning"]
            raw_ms, light_ms = 1e3 * statistics.median(raw_t), 1e3 * statistics.median(light_t)
            eps = sampler.meta_batch_size / (light_ms / 1e3)
            l2l_ms = 1e3 * statistics.median(times["learn2learn"]) if peer else float("nan")
            print(f"{label:52s} {precision:>10s} {raw_ms:8.2f} {light_ms:12.2f} {light_ms / raw_ms:6.3f} {eps:10.1f}"
                  f" {l2l_ms:8.2f} {l2l_ms / light_ms:8.3f}")
            results["runs"].append({"method": label, "precision": precision, "raw_ms": raw_ms,
                                    "lightning_ms": light_ms, "ratio": light_ms / raw_ms, "episodes_per_s": eps,
                                    "learn2learn_ms": l2l_ms if peer else None,
                                    "speedup_vs_learn2learn": l2l_ms / light_ms if peer else None})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
