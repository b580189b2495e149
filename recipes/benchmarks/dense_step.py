"""Training-step cost of dense multi-task learning: SegNet-MTAN on NYUv2's three tasks, per balancing method, level
and precision.

    python recipes/benchmarks/dense_step.py                                   # CPU, 288x384, fp32 and bf16-mixed
    python recipes/benchmarks/dense_step.py --accelerator cuda --steps 30 --warmup 5 --json out/dense_step.json

What runs: MTAN (Liu, Johns & Davison, CVPR 2019, arXiv:1803.10704) on lightning_mtl.nn.SegNet (VGG-16 widths, the
authors' attention reduction of 1), with NYUv2's tasks and their MTAN heads: ``SegmentationTask(13)``, ``DepthTask()``,
``NormalTask()``, in a ``MultiTaskModule`` (Adam, lr 1e-4, diagnostics off) trained by a Lightning Trainer at each
``--precisions`` entry. Inputs are ``--batch-size`` random ``3 x --height x --width`` images with valid random targets:
labels in 0..12 with 5% unlabelled (-1) pixels, depths in [0.1, 10) with 5% missing (0), unit normals with 5% missing
(zero vectors); the same seed, model initialisation and batches for every run. Every ``--methods`` name runs once if
it is a loss weighting (``equal`` is EW: the plain sum of the losses; level shown as ``-``) and once per ``--levels``
entry if it aggregates gradients (PCGrad, UPGrad: ``level="parameter"`` aggregates the (3, D) task-gradient matrix
over SegNet's and MTAN's shared parameters, ``"representation"`` the task gradients w.r.t. each task's attended map,
then runs one backward).

Time: a callback reads ``time.perf_counter`` at each ``on_train_batch_start`` and ``on_train_batch_end``
(after ``torch.cuda.synchronize`` on CUDA), so a step is the whole of ``training_step``: forward, losses, the
balancing path's backward passes, aggregation, the optimizer step, the finiteness checks and logging; not data
loading, nor the target checks and the transfer to the device, which Lightning runs before
``on_train_batch_start`` (``on_before_batch_transfer``, ``batch_to_device``). The first ``--warmup`` of the ``--steps``
steps (warm-up included) are not timed; ``ms/step`` is the median of the rest.

Memory, measured from the Trainer's ``on_train_start`` (model, heads and optimizer built and on the device, before
the first step; Adam's state is created in the first step, so it counts) to ``on_train_end``:

* CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``base`` = ``torch.cuda.memory_allocated()`` at the start and
  ``peak`` = ``torch.cuda.max_memory_allocated()`` at the end: bytes held by tensors (not the caching allocator's
  reserve). Runs share one process, one after the other.
* CPU: each run in its own Python subprocess (so that no run inherits another's allocations or allocator caches);
  ``base`` = its resident set size (``VmRSS`` in ``/proc/self/status``) at the start, right after its high-water mark
  was reset (``5`` written to ``/proc/self/clear_refs``), and ``peak`` = that high-water mark (``VmHWM``) at the end.
  ``+mem`` = peak - base is what training added at its peak as the kernel counts it: activations, gradients, Adam's
  state, autograd buffers, plus whatever the allocator kept from freed memory. ``resource.getrusage``'s
  ``ru_maxrss`` is not used: it is the high-water mark of the whole process and, after ``fork``/``vfork`` and
  ``exec``, carries the parent's, so a subprocess of a large parent reports the parent's peak. Where ``clear_refs``
  cannot be written, ``peak`` is the un-reset ``VmHWM`` and the row is marked ``*`` (an upper bound that includes
  model construction). Linux only; elsewhere memory is not reported.

On CPUs shared with other jobs pass ``--threads 1`` (OpenMP threads spinning on busy cores distort the timing), and
read the numbers as those of a loaded machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskBatch
from lightning_mtl.mtl import MultiTaskModule
from lightning_mtl.mtl.architectures import MTAN
from lightning_mtl.mtl.balancing import GradientAggregator, balancer_class
from lightning_mtl.mtl.tasks import DepthTask, NormalTask, SegmentationTask
from lightning_mtl.nn import SegNet
from lightning_mtl.records import provenance, table, write_json

CLASSES = 13  # NYUv2's
MISSING = 0.05  # fraction of unlabelled pixels per target
RESULT = "DENSE_STEP_RESULT "  # a child's stdout line carrying its result


def make_module(args, method: str, level: str) -> MultiTaskModule:
    torch.manual_seed(0)  # the same SegNet, attention and heads for every run
    tasks = {"segmentation": SegmentationTask(CLASSES), "depth": DepthTask(), "normal": NormalTask()}
    return MultiTaskModule(tasks=tasks, architecture=partial(MTAN, backbone=SegNet()),
                           input_shape=(3, args.height, args.width), balancer=method,
                           level="parameter" if level == "-" else level, diagnostics_every=0,
                           optimizer=lambda params: torch.optim.Adam(params, lr=1e-4))


def make_batches(args) -> list[MultiTaskBatch]:
    g = torch.Generator().manual_seed(1)
    b, h, w = args.batch_size, args.height, args.width

    def missing(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) < MISSING

    batches = []
    for _ in range(args.steps):
        labels = torch.randint(0, CLASSES, (b, h, w), generator=g).masked_fill(missing(b, h, w), -1)
        depth = (0.1 + 9.9 * torch.rand(b, 1, h, w, generator=g)).masked_fill(missing(b, 1, h, w), 0.0)
        normal = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1).masked_fill(missing(b, 1, h, w), 0.0)
        batches.append(MultiTaskBatch(torch.randn(b, 3, h, w, generator=g),
                                      {"segmentation": labels, "depth": depth, "normal": normal}))
    return batches


# ---------------------------------------------------------------------- measurement
def _proc_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")


class StepClock(L.Callback):
    """Each training step's wall time, and the memory between ``on_train_start`` and ``on_train_end`` (see the module
    docstring): :attr:`base_mb`, :attr:`peak_mb`, and :attr:`reset` (whether the CPU high-water mark was reset)."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.base_mb = self.peak_mb = None
        self.reset, self._start = True, 0.0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.base_mb = torch.cuda.memory_allocated(pl_module.device) / 2**20
        elif os.path.exists("/proc/self/status"):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current VmRSS
            except OSError:
                self.reset = False
            self.base_mb = _proc_kib("VmRSS") / 1024

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.step_s.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        elif self.base_mb is not None:
            self.peak_mb = _proc_kib("VmHWM") / 1024


def run_config(args, precision: str, method: str, level: str) -> dict:
    """One Trainer run of ``args.steps`` steps in this process; its row of the results."""
    model, clock = make_module(args, method, level), StepClock()
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, precision=precision, max_steps=args.steps, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[clock], limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=min(50, args.steps),
    )
    loader = DataLoader(make_batches(args), batch_size=None, shuffle=False, pin_memory=args.accelerator == "cuda")
    trainer.fit(model, train_dataloaders=loader)
    if len(clock.step_s) != args.steps:
        raise RuntimeError(f"{method}/{level}/{precision}: {len(clock.step_s)} of {args.steps} steps ran")
    timed = [1e3 * s for s in clock.step_s[args.warmup:]]
    memory = None if clock.peak_mb is None else clock.peak_mb - clock.base_mb
    row = {"precision": precision, "method": method, "level": level, "ms_per_step": statistics.median(timed),
           "step_ms": timed, "warmup_ms": [1e3 * s for s in clock.step_s[:args.warmup]], "base_mb": clock.base_mb,
           "peak_mb": clock.peak_mb, "memory_mb": memory, "peak_reset": clock.reset}
    del trainer, model
    gc.collect()
    if args.accelerator == "cuda":
        torch.cuda.empty_cache()
    return row


def run_subprocess(argv: list[str], precision: str, method: str, level: str) -> dict:
    """:func:`run_config` in a fresh Python process (CPU memory is per process); errors are raised, not skipped."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--run", precision, method, level]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"the {method}/{level}/{precision} run failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}{done.stdout[-1000:]}")
    return json.loads(lines[0][len(RESULT):])


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"],
                        choices=["32-true", "bf16-mixed", "16-mixed"], help="Lightning precisions")
    parser.add_argument("--methods", nargs="+", default=["equal", "pcgrad", "upgrad"],
                        help="registered balancer names (equal: EW)")
    parser.add_argument("--levels", nargs="+", default=["parameter", "representation"],
                        choices=["parameter", "representation"], help="levels of the gradient aggregators")
    parser.add_argument("--steps", type=int, default=20, help="steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 avoids OpenMP spinning "
                        "when other jobs share the cores")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--run", nargs=3, metavar=("PRECISION", "METHOD", "LEVEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in args.methods:
        balancer_class(name)  # an unknown name raises, listing the valid ones
    if args.warmup < 0 or args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 0")
    if min(args.height, args.width) < 32 or args.batch_size < 2:
        parser.error(f"SegNet's five poolings need --height and --width >= 32 and BatchNorm a --batch-size >= 2, got "
                     f"{args.height}x{args.width}, batch {args.batch_size}")
    return args


def levels_of(method: str, levels: list[str]) -> list[str]:
    return list(levels) if issubclass(balancer_class(method), GradientAggregator) else ["-"]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    for noise in (".*does not have many workers.*", ".*no `val_dataloader`.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=noise)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:  # a child: one configuration, its row on stdout
        print(RESULT + json.dumps(run_config(args, *args.run)), flush=True)
        return {}

    cuda = args.accelerator == "cuda"
    device = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads"
    measure = ("torch.cuda.max_memory_allocated - memory_allocated at train start" if cuda else
               "VmHWM - VmRSS at train start (high-water mark reset there), one subprocess per run")
    print(f"device: {device}; torch {torch.__version__}; lightning {L.__version__}")
    print(f"SegNet-MTAN, 3 NYUv2 tasks, batch {args.batch_size} x 3 x {args.height} x {args.width}, "
          f"{args.steps - args.warmup} timed steps (median) after {args.warmup}; memory: {measure}", flush=True)
    results = {"record": provenance([__file__, *argv], accelerator=args.accelerator),
               "device": device, "settings": vars(args), "memory_measure": measure, "runs": []}
    print_header(cuda)
    for precision in args.precisions:
        for method in args.methods:
            for level in levels_of(method, args.levels):
                row = (run_config(args, precision, method, level) if cuda
                       else run_subprocess(argv, precision, method, level))  # a child writes no --json
                results["runs"].append(row)
                print_row(row, results["runs"])  # as it comes: a long CPU run shows its rows before it ends
    results["tables"] = [tables(results)]
    if args.json:
        write_json(args.json, results)
    return results


def vs_equal(row: dict, rows: list[dict]) -> float | None:
    """``row``'s step time over ``equal``'s at the same precision (``None`` where equal did not run)."""
    equal = next((r["ms_per_step"] for r in rows if r["method"] == "equal" and r["precision"] == row["precision"]),
                 None)
    return row["ms_per_step"] / equal if equal else None


def tables(results: dict) -> dict:
    """The rows as the table ``recipes/report.py`` renders (``docs/benchmarks.md``)."""
    s, rows = results["settings"], results["runs"]
    return table(
        "SegNet-MTAN on NYUv2-shaped batches (segmentation, depth, normals): step time and memory",
        ["precision", "method", "level", "ms/step", "vs equal", "base MB", "peak MB", "added MB"],
        [[r["precision"], r["method"], r["level"], r["ms_per_step"], vs_equal(r, rows), r.get("base_mb"),
          r.get("peak_mb"), r["memory_mb"]] for r in rows],
        note=f"Batch {s['batch_size']} x 3 x {s['height']} x {s['width']}, median of {s['steps'] - s['warmup']} "
             f"timed steps after {s['warmup']}; memory: {results['memory_measure']}; {results['device']}.")


def print_header(cuda: bool) -> None:
    unit = "alloc MB" if cuda else "RSS MB"
    print(f"{'precision':>10s} {'method':>8s} {'level':>14s} {'ms/step':>9s} {'vs equal':>9s} "
          f"{'base ' + unit:>14s} {'peak ' + unit:>14s} {'+mem MB':>9s}", flush=True)


def print_row(row: dict, rows: list[dict]) -> None:
    """``row`` of the table; ``vs equal`` divides by ``equal`` at the same precision, where it ran before."""
    ratio = vs_equal(row, rows)
    ratio = f"{ratio:9.2f}" if ratio else f"{'-':>9s}"
    if row["memory_mb"] is None:
        memory = f"{'-':>14s} {'-':>14s} {'-':>9s}"
    else:
        mark = "" if row["peak_reset"] else "*"
        memory = f"{row['base_mb']:14.0f} {row['peak_mb']:14.0f} {mark + format(row['memory_mb'], '.0f'):>9s}"
    print(f"{row['precision']:>10s} {row['method']:>8s} {row['level']:>14s} {row['ms_per_step']:9.1f} {ratio} "
          f"{memory}", flush=True)


if __name__ == "__main__":
    main()
