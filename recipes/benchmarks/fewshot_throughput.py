"""Few-shot throughput: our Lightning modules vs a raw PyTorch loop of the same math and vs learn2learn, and the
episode sampler.

    python recipes/benchmarks/fewshot_throughput.py                     # CPU, fp32 and bf16-mixed
    python recipes/benchmarks/fewshot_throughput.py --accelerator cuda --precision bf16-mixed 16-mixed 32
    python recipes/benchmarks/fewshot_throughput.py --accelerator cuda --precision 32 bf16-mixed --maml-meta-batch 4 32

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
  is written for Lightning 1.x), once per ``--maml-meta-batch`` size (tasks per meta-batch; default 4).

Every row names the device it ran on (``device``). On CUDA, ``peak MB`` (JSON ``peak_mem_mb``; also
``raw_peak_mem_mb`` and ``learn2learn_peak_mem_mb``) is ``torch.cuda.max_memory_allocated`` over a timed run, less
what was allocated when it started (after garbage collection), the largest over the repeats; elsewhere it is NaN
(JSON null). The JSON is rewritten after every row, so a run stopped early keeps the rows it finished. At the end a
``targets`` block checks the measured rows against issue #18's GPU targets: ours <= 1.03x the raw loop (every row),
second-order MAML >= 3x learn2learn's episodes/s (every MAML row) and bf16-mixed / fp32 peak memory <= 0.6 for MAML
meta-batch 32 (when both precisions ran on CUDA): PASS, FAIL or n.a. with the reason.
"""

from __future__ import annotations

import argparse
import gc
import math
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
from lightning_mtl.records import provenance, table, write_json


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


class PeakMemory:
    """On CUDA, ``mb``: the peak memory allocated inside ``with`` above what was allocated when it began (after garbage
    collection, so that earlier runs' leftovers do not count); NaN on other devices."""

    def __init__(self, device: torch.device | str) -> None:
        self.device, self.mb, self.start_mb = torch.device(device), float("nan"), float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self._start = torch.cuda.memory_allocated()
            self.start_mb = self._start / 2**20
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20


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


def maml_label(meta_batch: int) -> str:
    return f"MAML 2nd order 5-way 1-shot 15-query, meta-batch {meta_batch}"


def is_fp32(precision: str) -> bool:
    return precision in ("32", "32-true")


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


def check_targets(runs: list[dict]) -> list[dict]:
    """Issue #18's GPU targets, evaluated on the measured rows: one dict per check, with the measured value (None if
    it could not be measured), the threshold and ``PASS``, ``FAIL`` or ``n.a.`` (with the reason)."""
    checks = []

    def add(target, row, value, threshold, ok, why=None):
        checks.append({"target": target, "row": row, "value": value if finite(value) else None,
                       "threshold": threshold, "verdict": "n.a." if not finite(value) else "PASS" if ok else "FAIL",
                       "reason": why if not finite(value) else None})

    for r in runs:
        row = f"{r['method']}, {r['precision']}"
        add("ours <= 1.03x raw loop (step time)", row, r["ratio"], 1.03, finite(r["ratio"]) and r["ratio"] <= 1.03,
            "no ratio")
    for r in runs:
        if r["method"].startswith("MAML"):
            s = r["speedup_vs_learn2learn"]
            add("2nd-order MAML >= 3x learn2learn episodes/s", f"{r['method']}, {r['precision']}", s, 3.0,
                finite(s) and s >= 3.0, "learn2learn not run")
    by = {(r["method"], r["precision"]): r for r in runs}
    label = maml_label(32)
    fp32 = next((r for (m, p), r in by.items() if m == label and is_fp32(p)), None)
    bf16 = by.get((label, "bf16-mixed"))
    if fp32 is None or bf16 is None:
        why = "needs MAML meta-batch 32 at both 32 and bf16-mixed"
        value = None
    elif not (finite(fp32["peak_mem_mb"]) and finite(bf16["peak_mem_mb"]) and fp32["peak_mem_mb"] > 0):
        why, value = "peak memory is measured on CUDA only", None
    else:
        why, value = None, bf16["peak_mem_mb"] / fp32["peak_mem_mb"]
    add("bf16-mixed / fp32 peak memory <= 0.6", label, value, 0.6, finite(value) and value <= 0.6, why)
    return checks


def tables(results: dict) -> list[dict]:
    """The rows so far as the tables ``recipes/report.py`` renders (``docs/benchmarks.md``)."""
    steps = table(
        "Training step: ours (Lightning) against the raw PyTorch loop and learn2learn",
        ["method", "precision", "raw ms", "ours ms", "ours / raw", "episodes/s", "learn2learn ms",
         "learn2learn / ours", "peak MB", "device"],
        [[r["method"], r["precision"], r["raw_ms"], r["lightning_ms"], r["ratio"], r["episodes_per_s"],
          r["learn2learn_ms"], r["speedup_vs_learn2learn"], r["peak_mem_mb"], r["device"]] for r in results["runs"]],
        note=f"Median step time over {results['settings']['repeats']} alternating repeats of "
             f"{results['settings']['steps'] - results['settings']['warmup']} timed steps each; "
             f"learn2learn's Conv-4: --l2l-layout {results['l2l_layout']}; data: {results['data']}; episode "
             f"sampler alone: {results['sampler_episodes_per_s']:,.0f} episodes/s (5-way 1-shot 15-query, one "
             f"process). Peak MB is measured on CUDA only.")
    found = [steps]
    if results["targets"]:
        found.append(table("Targets of issue #18 (stated for the GPU)",
                           ["target", "row", "value", "threshold", "verdict", "why n.a."],
                           [[c["target"], c["row"], c["value"], c["threshold"], c["verdict"], c["reason"]]
                            for c in results["targets"]]))
    return found


def headline(results: dict) -> list[list[str]]:
    """One line per method for the README: at each precision, our step against the raw loop's and learn2learn's."""
    lines: dict[str, list[str]] = {}
    for r in results["runs"]:
        peer = (f", {r['speedup_vs_learn2learn']:.2f}× learn2learn's speed"
                if r["speedup_vs_learn2learn"] is not None else "")
        lines.setdefault(r["method"], []).append(f"{r['precision']}: {r['ratio']:.2f}× the raw loop's time{peer}")
    return [[f"{method}: training step", "; ".join(parts)] for method, parts in lines.items()]


def save(path: str | None, results: dict) -> None:
    if path:
        write_json(path, {**results, "tables": tables(results), "headline": headline(results)})


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
    parser.add_argument("--maml-meta-batch", type=int, nargs="+", default=[4], metavar="TASKS",
                        help="MAML meta-batch sizes (tasks per step), one set of rows each")
    parser.add_argument("--no-learn2learn", action="store_true", help="skip the learn2learn peer")
    parser.add_argument("--l2l-layout", default="l2l", choices=["l2l", "same", "nchw"],
                        help="the peers' Conv-4: learn2learn's CNN4Backbone(max_pool=True), ours exactly "
                             "(channels-last), or ours in NCHW layout")
    parser.add_argument("--json", help="also write the results here (rewritten after every row)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if min(args.maml_meta_batch) < 1:
        parser.error(f"--maml-meta-batch sizes must be >= 1, got {args.maml_meta_batch}")
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        parser.error("--accelerator cuda, but torch sees no CUDA device")
    peer = not args.no_learn2learn and learn2learn_available()
    device = torch.device(args.accelerator)

    images, source = class_images()
    rate = sampler_rate(images)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; lightning {L.__version__}; data: {source}")
    print(f"episode sampler, 5-way 1-shot 15-query, one process: {rate:,.0f} episodes/s")

    # (method, meta-batch): ProtoNet's episodes are single tasks; MAML's meta-batches hold --maml-meta-batch tasks
    settings = {("protonet", 1): (lambda: ProtoNet(), EpisodeSampler(images, 60, 1, 5, 1), raw_protonet_step,
                                  "ProtoNet 60-way 1-shot 5-query")}
    for m in dict.fromkeys(args.maml_meta_batch):
        settings[("maml", m)] = (lambda: MAML(ways=5), EpisodeSampler(images, 5, 1, 15, m), raw_maml_step,
                                 maml_label(m))
    if peer:
        print(f"learn2learn peers' Conv-4: --l2l-layout {args.l2l_layout}")
    results = {"record": provenance(accelerator=args.accelerator), "device": device_name,
               "sampler_episodes_per_s": rate, "l2l_layout": args.l2l_layout, "settings": vars(args), "data": source,
               "torch": torch.__version__, "lightning": L.__version__,
               "complete": False, "runs": [], "targets": []}
    print(f"{'method':52s} {'precision':>10s} {'raw ms':>8s} {'lightning ms':>12s} {'ratio':>6s} {'episodes/s':>10s}"
          f" {'l2l ms':>8s} {'l2l/ours':>8s} {'peak MB':>8s}  device")
    for method, meta_batch in [key for m in dict.fromkeys(args.methods) for key in settings if key[0] == m]:
        make_model, sampler, raw_step, label = settings[(method, meta_batch)]
        rngs = np.random.SeedSequence(1).spawn(args.steps)
        episodes = [sampler.episode([np.random.default_rng(s)]) if sampler.meta_batch_size == 1 else
                    sampler.episode([np.random.default_rng(c) for c in s.spawn(sampler.meta_batch_size)])
                    for s in rngs]
        for precision in args.precision:
            loops = ("raw", "lightning", "learn2learn") if peer else ("raw", "lightning")
            times: dict[str, list[float]] = {loop: [] for loop in loops}
            peaks: dict[str, list[float]] = {loop: [] for loop in loops}
            for r in range(args.repeats):  # alternate the order, so that drift favours no loop
                for loop in loops if r % 2 == 0 else loops[::-1]:
                    with PeakMemory(device) as peak:
                        if loop == "raw":
                            t = time_raw(make_model, raw_step, episodes, device, precision, args.warmup)
                        elif loop == "lightning":
                            t = time_lightning(make_model, episodes, args.accelerator, precision, args.warmup)
                        elif method == "protonet":
                            t = time_l2l_protonet(episodes, args.accelerator, precision, args.warmup, args.l2l_layout)
                        else:
                            t = time_l2l_maml(episodes, device, precision, args.warmup, args.l2l_layout)
                    times[loop].append(t)
                    peaks[loop].append(peak.mb)
            raw_t, light_t = times["raw"], times["lightning"]
            raw_ms, light_ms = 1e3 * statistics.median(raw_t), 1e3 * statistics.median(light_t)
            eps = sampler.meta_batch_size / (light_ms / 1e3)
            l2l_ms = 1e3 * statistics.median(times["learn2learn"]) if peer else float("nan")
            peak_mb = {loop: max(v) if finite(v[0]) else None for loop, v in peaks.items()}
            peak_str = f"{peak_mb['lightning']:8.1f}" if peak_mb["lightning"] is not None else f"{'nan':>8s}"
            print(f"{label:52s} {precision:>10s} {raw_ms:8.2f} {light_ms:12.2f} {light_ms / raw_ms:6.3f} {eps:10.1f}"
                  f" {l2l_ms:8.2f} {l2l_ms / light_ms:8.3f} {peak_str}  {device_name}", flush=True)
            results["runs"].append({"method": label, "meta_batch": sampler.meta_batch_size, "precision": precision,
                                    "raw_ms": raw_ms, "lightning_ms": light_ms, "ratio": light_ms / raw_ms,
                                    "episodes_per_s": eps, "learn2learn_ms": l2l_ms if peer else None,
                                    "speedup_vs_learn2learn": l2l_ms / light_ms if peer else None,
                                    "peak_mem_mb": peak_mb["lightning"], "raw_peak_mem_mb": peak_mb["raw"],
                                    "learn2learn_peak_mem_mb": peak_mb.get("learn2learn"), "device": device_name,
                                    "repeats_ms": {loop: [1e3 * t for t in v] for loop, v in times.items()}})
            save(args.json, results)

    results["targets"] = check_targets(results["runs"])
    results["complete"] = True
    print(f"targets (issue #18 item 5, stated for the GPU; measured on {device_name}):")
    for c in results["targets"]:
        value = f"{c['value']:.3f}" if c["value"] is not None else "-"
        print(f"  {c['verdict']:5s} {c['target']}: {c['row']}: {value} (threshold {c['threshold']:g})"
              + (f"; {c['reason']}" if c["reason"] else "") + f"  [{device_name}]")
    save(args.json, results)


if __name__ == "__main__":
    main()
