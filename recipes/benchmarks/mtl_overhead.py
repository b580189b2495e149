"""Training-step cost of MultiTaskModule's balancing methods, and of its gradient plumbing against torchjd.

    python recipes/benchmarks/mtl_overhead.py                                  # CPU, K = 4 and 50, every method
    python recipes/benchmarks/mtl_overhead.py --accelerator cuda --backbone conv4 --methods equal pcgrad upgrad

On one synthetic data set (``--batch-size`` random 1x28x28 inputs, ``--classes`` random labels per task) and one
model (a shared ``--backbone`` + one linear head per task, the same initialisation everywhere), it times:

* every ``--methods`` name in MultiTaskModule through a Lightning Trainer, relative to ``equal`` at the same K;
  loss weightings once, gradient aggregators at ``level="parameter"`` (once per ``--jacobians`` mode, shown as
  ``parameter:<mode>`` unless ``auto``) and ``level="representation"``;
* ``torch:equal``: a plain PyTorch loop on the sum of the losses (the floor: one backward pass, no framework);
* ``torchjd:<name>`` for every ``--torchjd`` name: a plain PyTorch loop with ``torchjd.autojac.mtl_backward`` +
  ``jac_to_grad`` and the same torchjd aggregator object our registry builds (these names are also timed in ours).

Timing starts after ``--warmup`` steps; runs alternate in order, then in reverse order, ``--repeats`` times, and
the median ms/step of each is reported. ``ours/torchjd`` divides our time by torchjd's for the same aggregator. It
compares whole steps: ours includes Lightning's loop and the module's checks (target range, finiteness), torchjd's
is a bare loop, and at ``level="representation"`` ours aggregates a different matrix (task gradients w.r.t. the
shared representation) than torchjd (the Jacobian w.r.t. the shared parameters, obtained with one vmapped backward).
On CPUs shared with other jobs pass ``--threads 1``: OpenMP threads spin-waiting for a busy core can slow a step 50x.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from importlib.metadata import version

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchjd.autojac import jac_to_grad, mtl_backward

from lightning_mtl import MultiTaskBatch
from lightning_mtl.callbacks import StepTimer
from lightning_mtl.mtl import MultiTaskModule
from lightning_mtl.mtl.balancing import GradientAggregator, balancer_class, list_balancers
from lightning_mtl.nn import Conv4


def make_backbone(kind: str, hidden: int) -> nn.Module:
    if kind == "conv4":
        return Conv4(in_channels=1, hidden_channels=hidden, out_channels=hidden)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU())


def make_module(args, k: int, method: str = "equal", level: str = "parameter", jacobian: str = "auto"
                ) -> MultiTaskModule:
    torch.manual_seed(0)  # the same backbone and heads for every run at this K
    backbone = make_backbone(args.backbone, args.hidden)
    return MultiTaskModule({f"t{i}": args.classes for i in range(k)}, backbone=backbone, balancer=method, level=level,
                           jacobian=jacobian, diagnostics_every=0,
                           optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))


def make_batches(args, k: int) -> list[MultiTaskBatch]:
    g = torch.Generator().manual_seed(1)
    return [MultiTaskBatch(torch.randn(args.batch_size, 1, 28, 28, generator=g),
                           {f"t{i}": torch.randint(0, args.classes, (args.batch_size,), generator=g) for i in range(k)})
            for _ in range(args.steps)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_lightning(args, k: int, method: str, level: str, batches: list[MultiTaskBatch]) -> float:
    level, _, jacobian = level.partition(":")  # "parameter:vmap" -> level "parameter", jacobian "vmap"
    model = make_module(args, k, method, level, jacobian or "auto")
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=len(batches), max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=min(50, len(batches)),
    )
    loader = DataLoader(batches, batch_size=None, shuffle=False, pin_memory=args.accelerator == "cuda")
    trainer.fit(model, train_dataloaders=loader)
    return timer.seconds_per_step


def time_raw(args, k: int, aggregator_name: str | None, batches: list[MultiTaskBatch]) -> float:
    """A plain PyTorch loop: sum of the losses and one backward (``None``), or torchjd's Jacobian descent."""
    device = torch.device(args.accelerator)
    module = make_module(args, k, "equal" if aggregator_name is None else aggregator_name).to(device)
    net, tasks = module.model, module.task_names  # the same HardSharing backbone + heads as ours
    shared, heads = net.shared_parameters(), [list(net.heads[t].parameters()) for t in tasks]
    aggregator = None if aggregator_name is None else module.balancer.aggregator  # the very torchjd object ours uses
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for i, batch in enumerate(batches):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        x = batch.x.to(device, non_blocking=True)
        z = net.representation(x)  # (B, D)
        losses = [F.cross_entropy(net.head(t, z), batch.targets[t].to(device, non_blocking=True)) for t in tasks]
        if aggregator is None:
            torch.stack(losses).sum().backward()
        else:
            mtl_backward(losses, features=z, tasks_params=heads, shared_params=shared)
            jac_to_grad(shared, aggregator)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - start) / (len(batches) - args.warmup)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 50], help="numbers of tasks K")
    parser.add_argument("--methods", nargs="+", default=list_balancers(), help="registered balancer names")
    parser.add_argument("--torchjd", nargs="*", default=["upgrad", "mgda"], help="aggregators also run via torchjd")
    parser.add_argument("--jacobians", nargs="+", default=["auto"], choices=["auto", "loop", "vmap"],
                        help="parameter-level Jacobian modes to time (MultiTaskModule's `jacobian`)")
    parser.add_argument("--backbone", default="mlp", choices=["mlp", "conv4"], help="MLP 784-h-h-h or Conv-4 (h ch)")
    parser.add_argument("--hidden", type=int, default=512, help="MLP width / Conv-4 channels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10, help="classes per task")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 avoids OpenMP spinning "
                        "when other jobs share the cores")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    for name in args.methods + args.torchjd:
        balancer_class(name)  # an unknown name raises, listing the valid ones
    if any(name not in list_balancers("aggregator") for name in args.torchjd):
        parser.error(f"--torchjd takes gradient aggregators: {', '.join(list_balancers('aggregator'))}")
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for noise in (".*does not have many workers.*", ".*no `val_dataloader`.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=noise)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.accelerator)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; lightning {L.__version__}; torchjd {version('torchjd')}")
    print(f"backbone {args.backbone} (hidden {args.hidden}), batch {args.batch_size}, {args.classes} classes/task, "
          f"{args.steps - args.warmup} timed steps after {args.warmup}, median of {args.repeats}")

    # runs are (loop, method, level): loop "ours" (Lightning + MultiTaskModule), "torch" or "torchjd" (plain loops)
    ours = list(dict.fromkeys(["equal", *args.methods, *args.torchjd]))
    param_levels = ["parameter" if j == "auto" else f"parameter:{j}" for j in args.jacobians]
    runs = [("ours", m, lvl) for m in ours for lvl in (
        (*param_levels, "representation") if issubclass(balancer_class(m), GradientAggregator) else ("-",))]
    runs += [("torch", "equal", "-")] + [("torchjd", m, "mtl_backward") for m in args.torchjd]
    results = {"device": device_name, "settings": vars(args), "runs": []}
    header = f"{'method':>20s} {'level':>14s} {'K':>4s} {'ms/step':>9s} {'vs equal':>9s} {'ours/torchjd':>12s}"
    print(header)
    for k in args.tasks:
        batches = make_batches(args, k)
        times: dict[tuple[str, str, str], list[float]] = {run: [] for run in runs}
        for r in range(args.repeats):  # alternate the order, so that drift favours no run
            for loop, method, level in runs if r % 2 == 0 else runs[::-1]:
                if loop == "ours":
                    t = time_lightning(args, k, method, level if level != "-" else "parameter", batches)
                else:
                    t = time_raw(args, k, method if loop == "torchjd" else None, batches)
                times[(loop, method, level)].append(t)
        ms = {run: 1e3 * statistics.median(ts) for run, ts in times.items()}
        equal_ms = ms[("ours", "equal", "-")]
        for loop, method, level in runs:
            t = ms[(loop, method, level)]
            jd = ms.get(("torchjd", method, "mtl_backward")) if loop == "ours" else None
            name = method if loop == "ours" else f"{loop}:{method}"
            vs_jd = f"{t / jd:12.3f}" if jd else f"{'-':>12s}"
            print(f"{name:>20s} {level:>14s} {k:4d} {t:9.2f} {t / equal_ms:9.3f} {vs_jd}")
            results["runs"].append({"loop": loop, "method": method, "level": level, "tasks": k, "ms_per_step": t,
                                    "ratio_vs_equal": t / equal_ms, "ratio_vs_torchjd": t / jd if jd else None,
                                    "repeats_ms": [1e3 * v for v in times[(loop, method, level)]]})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
