"""Soak test of the episodic data pipeline: a long training stream through worker processes, fixed evaluation sets.

    python recipes/benchmarks/soak.py --episodes 10000 --workers 4            # data only (the default)
    python recipes/benchmarks/soak.py --episodes 10000 --workers 4 --train    # real ProtoNet steps in a Trainer

Real Omniglot (Vinyals split, from ``$LIGHTNING_MTL_DATA``; cache in ``$LIGHTNING_MTL_CACHE``) through
:class:`~lightning_mtl.datamodules.OmniglotEpisodes` and its own dataloaders, ``--workers`` worker processes. The
exit status is non-zero when one of these checks fails (each is a key of ``checks`` in the summary):

* **No duplicate episode in the fixed validation and test sets.** Two episodes are duplicates when they pose the same
  task: the same classes with the same support images and the same query images per class, whatever the order of the
  images and the labels given to the classes. Images are compared by content (a 64-bit random linear hash of the
  pixels), so pixel-identical images of two classes count as one image. Each episode is reduced to a canonical key:
  fingerprints sorted within (class, support) and (class, query), classes sorted, the result hashed (blake2b, 64
  bits). Both sets are read twice through their dataloaders: complete and identical both times. Duplicates inside
  the training stream and overlaps between the streams are reported, not judged.
* **Resident memory growth <= ``--max-growth`` (5%) after warm-up** on the training stream. RSS (``VmRSS``) of the
  main process plus all its descendants (the dataloader workers) is sampled every ``--sample-every`` episodes; the
  baseline is the first sample once ``--warmup`` (10%) of the episodes are done, and growth is
  ``(max of the later samples - baseline) / baseline`` (the growth at the end is reported too). Forked workers share
  the parent's pages, which RSS counts again in every process; PSS (each shared page split between its sharers, so
  the sum is the memory really used) is held to the same limit.

Data only (default): each meta-batch is pulled from the train dataloader and fingerprinted, nothing else; this
isolates the data pipeline. ``--train``: the same dataloader feeds ``Trainer.fit`` of a Conv-4 ProtoNet (fp32, no
logger, no checkpoints, no validation), the samples and fingerprints taken in a callback after each step; this also
covers the model, optimizer and Lightning's loop (and takes far longer on a CPU). A JSON summary goes to stdout and,
with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lightning_mtl import Episode
from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes
from lightning_mtl.meta import ProtoNet
from lightning_mtl.records import provenance, table

# odd 64-bit weights of the image fingerprint (a random linear hash of the pixels, modulo 2**64)
_WEIGHTS = np.random.default_rng(20240601).integers(1, 2**63, 28 * 28 * 64, dtype=np.uint64) | np.uint64(1)


def fingerprints(images: torch.Tensor) -> np.ndarray:
    """``(N,)`` uint64 content fingerprints of ``(N, C, H, W)`` uint8 images."""
    flat = images.reshape(images.shape[0], -1).numpy().astype(np.uint64)  # (N, pixels)
    if flat.shape[1] > _WEIGHTS.size:
        raise ValueError(f"images of {flat.shape[1]} values exceed the {_WEIGHTS.size} fingerprint weights")
    with np.errstate(over="ignore"):  # wrap-around is the point: arithmetic modulo 2**64
        return (flat * _WEIGHTS[: flat.shape[1]]).sum(axis=1, dtype=np.uint64)


def _by_class(fps: np.ndarray, labels: torch.Tensor, ways: int) -> np.ndarray:
    """``(ways, per_class)`` fingerprints grouped by label, sorted within each class."""
    order = np.argsort(labels.numpy(), kind="stable")
    return np.sort(fps[order].reshape(ways, -1), axis=1)


def episode_keys(batch: Episode) -> list[int]:
    """Canonical 64-bit key of each episode of a meta-batch (see the module docstring)."""
    keys = []
    for b in range(batch.meta_batch_size):
        support = _by_class(fingerprints(batch.support_x[b]), batch.support_y[b], batch.ways)  # (ways, shots)
        query = _by_class(fingerprints(batch.query_x[b]), batch.query_y[b], batch.ways)  # (ways, queries)
        rows = np.concatenate([support, query], axis=1)  # one row per class; classes in canonical (sorted) order
        rows = rows[np.lexsort(rows.T[::-1])]
        keys.append(int.from_bytes(hashlib.blake2b(rows.tobytes(), digest_size=8).digest(), "little"))
    return keys


# ---------------------------------------------------------------- memory
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return out


def _descendants(pid: int) -> list[int]:
    todo, seen = _children(pid), []
    while todo:
        child = todo.pop()
        seen.append(child)
        todo += _children(child)
    return seen


def _kib(path: str, field: str) -> int:
    """``field`` (kB) of a /proc file, 0 when the process is gone or the field absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_sample(pid: int | None = None, exclude: frozenset[int] = frozenset()) -> dict:
    """RSS and PSS in MiB of the main process and of its descendants (the dataloader workers), leaving out the
    processes in ``exclude`` (those that existed before the soak, e.g. a logger's service under pytest)."""
    pid = os.getpid() if pid is None else pid
    kids = [k for k in _descendants(pid) if k not in exclude]

    def mib(field: str, name: str, pids: list[int]) -> float:
        return sum(_kib(f"/proc/{p}/{name}", field) for p in pids) / 1024

    return {"rss_main": mib("VmRSS", "status", [pid]), "rss_workers": mib("VmRSS", "status", kids),
            "pss_main": mib("Pss", "smaps_rollup", [pid]), "pss_workers": mib("Pss", "smaps_rollup", kids),
            "processes": 1 + len(kids)}


class Soak:
    """Collects the training-stream keys and the memory samples, whoever drives the dataloader."""

    def __init__(self, episodes: int, sample_every: int) -> None:
        self.keys = np.zeros(episodes, dtype=np.uint64)  # preallocated: the bookkeeping itself does not grow
        self.seen, self.sample_every, self.samples, self.start = 0, sample_every, [], time.perf_counter()
        self.exclude = frozenset(_descendants(os.getpid()))  # not ours: only workers started from here are counted

    def take(self, batch: Episode) -> None:
        keys = episode_keys(batch)[: len(self.keys) - self.seen]
        before = self.seen
        self.keys[before : before + len(keys)] = keys
        self.seen += len(keys)
        if self.seen // self.sample_every > before // self.sample_every or self.seen == len(self.keys):
            self.samples.append({"episodes": self.seen, "seconds": time.perf_counter() - self.start,
                                 **memory_sample(exclude=self.exclude)})


class _SoakCallback(L.Callback):
    def __init__(self, soak: Soak) -> None:
        self.soak = soak

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.soak.take(batch)


def tables(summary: dict) -> list[dict]:
    """The checks and the memory growth as the tables ``recipes/report.py`` renders (``docs/benchmarks.md``)."""
    stream, memory = summary["training_stream"], summary["memory"]
    s = summary["settings"]
    return [
        table("Memory after warm-up", ["measure", "baseline MiB", "largest MiB", "end MiB", "largest growth",
                                       "growth at the end"],
              [[name, m["baseline_mib"], m["max_mib"], m["end_mib"], f"{100 * m['growth_max']:+.2f}%",
                f"{100 * m['growth_end']:+.2f}%"]
               for name, m in memory.items() if isinstance(m, dict)],
              note=f"{stream['episodes']:,} training episodes ({s['ways']}-way {s['shots']}-shot {s['queries']}-query,"
                   f" meta-batch {s['meta_batch_size']}) through {s['workers']} workers, {summary['mode']}, "
                   f"{stream['episodes_per_second']:,} episodes/s; baseline at episode "
                   f"{memory['baseline_at_episode']:,}; growth limit {100 * s['max_growth']:g}%."),
        table("Checks", ["check", "passed"], [[name, ok] for name, ok in summary["checks"].items()]),
    ]


def growth(samples: list[dict], warmup: float, total: int) -> dict:
    """Memory growth after warm-up of RSS (main + workers), with the per-process and PSS figures beside it."""
    later = [s for s in samples if s["episodes"] >= warmup * total]
    if len(later) < 2:
        raise ValueError(f"only {len(later)} memory samples after warm-up; lower --sample-every")
    out = {"baseline_at_episode": later[0]["episodes"], "samples_after_warmup": len(later)}
    for name, fields in {"rss_total": ("rss_main", "rss_workers"), "rss_main": ("rss_main",),
                         "rss_workers": ("rss_workers",), "pss_total": ("pss_main", "pss_workers")}.items():
        values = [sum(s[f] for f in fields) for s in later]
        base = values[0]
        out[name] = {"baseline_mib": round(base, 1), "max_mib": round(max(values[1:]), 1),
                     "end_mib": round(values[-1], 1),
                     "growth_max": round((max(values[1:]) - base) / base, 4),
                     "growth_end": round((values[-1] - base) / base, 4)}
    return out


def eval_set_keys(dm: OmniglotEpisodes, stage: str) -> list[int]:
    """Keys of the fixed ``stage`` set, in the order its dataloader serves them; its workers end on return."""
    loader = dm.val_dataloader() if stage == "val" else dm.test_dataloader()
    keys = [k for batch in loader for k in episode_keys(batch)]
    del loader  # persistent workers: let them go before the soak measures memory
    return keys


def duplicates(keys) -> int:
    """Episodes that repeat an earlier one (``len(keys) - distinct``)."""
    keys = np.asarray(keys, dtype=np.uint64)
    return int(keys.size - np.unique(keys).size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=10_000, help="training episodes to draw")
    p.add_argument("--workers", type=int, default=4, help="dataloader worker processes")
    p.add_argument("--train", action="store_true", help="run real ProtoNet training steps (default: data only)")
    p.add_argument("--accelerator", default="auto", help="Trainer accelerator of --train")
    p.add_argument("--ways", type=int, default=60, help="training ways (the quick configs train 60-way)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--meta-batch-size", type=int, default=1)
    p.add_argument("--val-episodes", type=int, default=600)
    p.add_argument("--test-episodes", type=int, default=1000)
    p.add_argument("--sample-every", type=int, default=100, help="episodes between two memory samples")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the episodes before the memory baseline")
    p.add_argument("--max-growth", type=float, default=0.05, help="largest accepted RSS growth after warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the summary there")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # read before the soak: the checkout may change during a long one ("auto": the device the Trainer will pick)
    record = provenance(["recipes/benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)],
                        accelerator=(None if args.accelerator == "auto" else args.accelerator) if args.train else "cpu")
    for noise in (".*does not have many workers.*", ".*LeafSpec.*", ".*`IterableDataset` has `__len__`.*",
                  ".*transfer_batch_to_device.*", ".*val_dataloader.*"):
        warnings.filterwarnings("ignore", message=noise)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    dm = OmniglotEpisodes(download=False, episodes=EpisodeSettings(
        train_ways=args.ways, train_shots=args.shots, train_queries=args.queries, meta_batch_size=args.meta_batch_size,
        val_episodes=args.val_episodes, test_episodes=args.test_episodes, seed=args.seed, num_workers=args.workers))
    dm.prepare_data()
    dm.setup("fit")

    evaluation = {}
    for stage, count in (("val", args.val_episodes), ("test", args.test_episodes)):
        first, second = eval_set_keys(dm, stage), eval_set_keys(dm, stage)
        evaluation[stage] = {"episodes": len(first), "expected": count, "duplicates": duplicates(first),
                             "identical_on_reread": first == second, "keys": first}
    t_eval = time.perf_counter() - t0

    soak = Soak(args.episodes, args.sample_every)
    soak.samples.append({"episodes": 0, "seconds": 0.0, **memory_sample(exclude=soak.exclude)})  # before the workers
    steps = math.ceil(args.episodes / args.meta_batch_size)
    if args.train:
        trainer = L.Trainer(max_steps=steps, accelerator=args.accelerator, precision="32-true", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[_SoakCallback(soak)])
        trainer.fit(ProtoNet(), datamodule=dm)
    else:
        for step, batch in enumerate(dm.train_dataloader()):
            soak.take(batch)
            if step + 1 == steps:
                break
    t_train = time.perf_counter() - t0 - t_eval

    train_keys = soak.keys[: soak.seen]
    val_keys, test_keys = (set(evaluation[s].pop("keys")) for s in ("val", "test"))
    memory = growth(soak.samples, args.warmup, args.episodes)
    checks = {
        "eval_sets_complete": all(e["episodes"] == e["expected"] for e in evaluation.values()),
        "no_duplicate_in_val": evaluation["val"]["duplicates"] == 0,
        "no_duplicate_in_test": evaluation["test"]["duplicates"] == 0,
        "eval_sets_fixed": all(e["identical_on_reread"] for e in evaluation.values()),
        "training_episodes_drawn": soak.seen == args.episodes,
        "rss_growth_within_limit": memory["rss_total"]["growth_max"] <= args.max_growth,
        "pss_growth_within_limit": memory["pss_total"]["growth_max"] <= args.max_growth,
    }
    summary = {
        "command": " ".join(["python recipes/benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)]),
        "mode": f"train (ProtoNet Conv-4, fp32, Trainer on {args.accelerator})" if args.train else "data only",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "evaluation": evaluation,
        "training_stream": {
            "episodes": int(soak.seen), "duplicates": duplicates(train_keys),
            "also_in_val": int(sum(int(k) in val_keys for k in train_keys)),
            "also_in_test": int(sum(int(k) in test_keys for k in train_keys)),
            "val_test_overlap": len(val_keys & test_keys),
            "episodes_per_second": round(soak.seen / t_train, 1),
        },
        "memory": memory,
        "wall_seconds": {"eval_sets": round(t_eval, 1), "training_stream": round(t_train, 1),
                         "total": round(time.perf_counter() - t0, 1)},
        "checks": checks,
        "passed": all(checks.values()),
        "samples": [{k: round(v, 1) if isinstance(v, float) else v for k, v in s.items()} for s in soak.samples],
    }
    summary["record"] = record
    summary["tables"] = tables(summary)
    stream, rss, pss = summary["training_stream"], memory["rss_total"], memory["pss_total"]
    summary["headline"] = [[
        f"{stream['episodes']:,} training episodes through {args.workers} workers",
        f"memory after warm-up {100 * rss['growth_max']:+.2f}% RSS, {100 * pss['growth_max']:+.2f}% PSS (limit "
        f"{100 * args.max_growth:g}%); {stream['duplicates']} duplicate episodes; checks "
        f"{'passed' if all(checks.values()) else 'FAILED'}"]]
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
