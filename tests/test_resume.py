"""Exact resume: a recipe fit SIGKILLed at a random point and resumed with ``--ckpt_path last`` ends bit-identical to an
uninterrupted run, in one process and under 2-process DDP (weights, optimizer, schedulers, balancer and RNG states,
data position, logged metrics); a kill during a checkpoint write never leaves a truncated ``last.ckpt``.

Each resume test starts the uninterrupted run and the run to kill side by side (real processes, real data, dataloader
workers), kills the second at a seeded random point after its second ``last.ckpt``, resumes it, and compares.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_mtl.datamodules import OmniglotAlphabets

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
STEPS, EVERY, VAL_EVERY = 35, 7, 14  # last.ckpt at 7, 14 (after validation), 21, 28 (after validation), 35
TIMING_KEYS = {"train/episodes_per_s"}  # wall-clock measurements: never reproducible


@pytest.fixture
def env(omniglot_root, cache_dir):
    # decode the archives once, here, rather than in two runs at once (both recipes share the 28-pixel cache)
    OmniglotAlphabets(root=str(omniglot_root), cache_dir=str(cache_dir), download=False).prepare_data()
    return {**os.environ, "LIGHTNING_MTL_DATA": str(omniglot_root), "LIGHTNING_MTL_CACHE": str(cache_dir),
            "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
            # one thread per process: two runs side by side on 2 cores would otherwise spend most of their time in
            # OpenMP spin-waits (and bit-identity only needs both runs to use the same thread count)
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _common(run: Path) -> list[str]:
    return [f"--trainer.max_steps={STEPS}", f"--trainer.val_check_interval={VAL_EVERY}", "--trainer.max_time=null",
            "--trainer.precision=32", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={run}/logs", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--checkpoint.dirpath={run}/ckpt", f"--checkpoint.every_n_train_steps={EVERY}"]


def _launch(recipe: str, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:  # the child keeps its own descriptor
        # a session of its own: a kill reaches the whole group (under DDP, the other rank that rank 0 started)
        return subprocess.Popen([sys.executable, str(REPO / "recipes" / recipe), "fit", *args], env=env,
                                cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has already exited
        pass


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-6000:]


def _kill_at_a_random_point(proc: subprocess.Popen, last: Path, fraction: float, log: Path) -> None:
    """SIGKILL ``proc`` ``fraction`` of a checkpoint interval after its second ``last.ckpt`` (the kill lands at
    whatever it is doing). The interval is the time the run itself took from its first ``last.ckpt`` to its second,
    so the kill lands between the second checkpoint and the final one on a fast machine and a slow one alike (a fixed
    delay in seconds let a fast CI machine reach the final checkpoint first)."""
    deadline = time.monotonic() + 300

    def next_version(after: tuple | None) -> tuple:
        while True:
            assert proc.poll() is None, "the run ended before its second checkpoint:\n" + log.read_text()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s:\n" + log.read_text()[-6000:]
            try:
                st = last.stat()  # each save replaces the file (a new inode): AtomicCheckpointIO
                version = (st.st_ino, st.st_mtime_ns, st.st_size)
                if version != after:
                    return version
            except FileNotFoundError:
                pass
            time.sleep(0.005)

    first = next_version(None)
    t_first = time.monotonic()
    next_version(first)
    time.sleep(fraction * (time.monotonic() - t_first))
    _kill_group(proc)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before the kill"


def _rows(logs: Path) -> dict[int, list[dict[str, str]]]:
    """Logged rows by step, without empty cells and wall-clock measurements."""
    out: dict[int, list[dict[str, str]]] = {}
    for f in logs.rglob("metrics.csv"):
        for row in csv.DictReader(f.open()):
            row = {k: v for k, v in row.items() if v != "" and k not in TIMING_KEYS}
            if set(row) - {"epoch", "step"}:
                out.setdefault(int(row["step"]), []).append(row)
    return out


def assert_same_rows(expected: dict, got: dict, resumed_from: int) -> None:
    """Every row the resumed run logged is the uninterrupted run's row of that step, value for value, and no row of
    the uninterrupted run from ``resumed_from`` on is missing (Lightning's re-reports of the sparse ``diag/*``
    metrics included: the module re-logs the checkpoint's last diagnostics)."""
    assert got and min(got) == resumed_from and max(got) == max(expected), (sorted(got), resumed_from)
    for step, rows in got.items():
        left = list(expected[step])
        for row in rows:
            match = next((e for e in left if e == row), None)
            assert match is not None, f"step {step}: resumed {row} not among uninterrupted {expected[step]}"
            left.remove(match)
        assert not left, f"step {step}: the resumed run did not log {left}"


def assert_same(a, b, where: str = "checkpoint") -> None:
    """Bit-identical: ``torch.equal`` on every tensor, ``==`` on everything else, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "-"
            raise AssertionError(f"{where}: tensors differ (max abs difference {diff})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _final_state(ckpt_dir: Path) -> dict:
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == STEPS
    # the checkpoint callback's state holds this run's own paths
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if "dirpath" not in v}
    return state


def check_exact_resume(recipe: str, args: list[str], tmp_path: Path, env: dict, seed: int) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    full_proc = _launch(recipe, args + _common(full), env, full / "out.log")
    killed_proc = _launch(recipe, args + _common(killed), env, killed / "out.log")
    try:
        _kill_at_a_random_point(killed_proc, killed / "ckpt" / "last.ckpt", random.Random(seed).random(),
                                killed / "out.log")
        resumed_from = torch.load(killed / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
        assert 2 * EVERY <= resumed_from < STEPS
        resume_args = args + _common(killed) + [f"--trainer.logger.save_dir={tmp_path}/resumed_logs",
                                                "--ckpt_path=last"]
        resumed_proc = _launch(recipe, resume_args, env, tmp_path / "resumed.log")
        _wait(resumed_proc, tmp_path / "resumed.log")
        _wait(full_proc, full / "out.log")
    finally:
        for proc in (full_proc, killed_proc):
            _kill_group(proc)  # also any rank left behind
    assert_same(_final_state(full / "ckpt"), _final_state(killed / "ckpt"))
    assert_same_rows(_rows(full / "logs"), _rows(tmp_path / "resumed_logs"), resumed_from)


def test_fewshot_reptile_resumes_exactly_after_sigkill(env, tmp_path):
    """Reptile draws its inner-loop batches from torch's global generator, in training and validation."""
    args = ["--config", str(CONFIGS / "omniglot" / "reptile_5w1s_quick.yaml"), "--data.episodes.val_episodes=4",
            "--data.episodes.eval_meta_batch_size=4", "--data.episodes.train_queries=2",
            "--data.episodes.meta_batch_size=2", "--data.episodes.num_workers=2", "--model.inner_steps=2",
            "--model.eval_inner_steps=2",
            "--model.inner_batch_size=5"]
    check_exact_resume("fewshot.py", args, tmp_path, env, seed=1)


def test_fewshot_reptile_ddp_resumes_exactly_after_sigkill(env, tmp_path):
    """Two gloo processes, both killed: each rank's episode stream position and random states (Reptile's inner
    batches) come back from the one checkpoint rank 0 wrote. (Both ranks are seeded alike here, so a rank restored
    with rank 0's random states would pass; a rank restarting its stream at the wrong episode fails, checked by
    mutation.)"""
    env = {k: v for k, v in env.items() if not k.startswith(("PL_", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"))}
    args = ["--config", str(CONFIGS / "omniglot" / "reptile_5w1s_quick.yaml"), "--data.episodes.val_episodes=4",
            "--data.episodes.eval_meta_batch_size=2", "--data.episodes.train_queries=2",
            "--data.episodes.meta_batch_size=2", "--data.episodes.num_workers=1", "--model.inner_steps=2",
            "--model.eval_inner_steps=2",
            "--model.inner_batch_size=5", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.strategy=ddp"]
    check_exact_resume("fewshot.py", args, tmp_path, env, seed=3)
    for log in (tmp_path / "full" / "out.log", tmp_path / "resumed.log"):
        assert "Starting with 2 processes" in log.read_text(), log


def test_multitask_famo_resumes_exactly_after_sigkill(env, tmp_path):
    """FAMO's logits and Adam moments; three alphabets of 6, 7 and 8 batches per pass, cycled (max_size_cycle), so the
    kill lands mid-epoch with tasks at different passes."""
    args = ["--config", str(CONFIGS / "omniglot_alphabets" / "hps_famo_quick.yaml"),
            "--data.alphabets=[Tagalog,Alphabet_of_the_Magi,Greek]", "--data.batch_size=32", "--data.num_workers=1",
            "--model.diagnostics_every=5"]
    check_exact_resume("multitask.py", args, tmp_path, env, seed=2)


def test_multitask_ltb_pcgrad_resumes_exactly_after_sigkill(env, tmp_path):
    """Learning to Branch draws its Gumbel-softmax branching from the global generator at every step, and its leaves
    are task parameters outside PCGrad's matrix: the random states, the temperature buffer and both gradient paths
    must come back exactly. (Every architecture resumes exactly in process: tests/mtl/test_architecture_contract.py.)"""
    args = ["--config", str(CONFIGS / "omniglot_alphabets" / "ltb_quick.yaml"),
            "--data.alphabets=[Tagalog,Alphabet_of_the_Magi,Greek]", "--data.batch_size=16", "--data.num_workers=0",
            "--model.balancer=pcgrad", "--model.diagnostics_every=5"]
    check_exact_resume("multitask.py", args, tmp_path, env, seed=4)


# A slow disk for the recipe run below: every write into a checkpoint file (``os.write``, and ``os.sendfile``, which a
# copy across file systems uses) moves at most 64 KiB and takes 20 ms; the first write into each file is announced.
SLOW_DISK = r"""
import os, runpy, sys, time
real_write, real_sendfile, announced = os.write, os.sendfile, set()

def _allow(fd, n):
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return n
    if not path.endswith((".ckpt", ".ckpt.tmp")):
        return n
    key = (fd, os.fstat(fd).st_ino)
    if key not in announced:
        announced.add(key)
        print("WRITING", path, flush=True)
    time.sleep(0.02)
    return min(n, 1 << 16)

os.write = lambda fd, data: real_write(fd, data[:_allow(fd, len(data))])
os.sendfile = lambda out_fd, in_fd, offset, count: real_sendfile(out_fd, in_fd, offset, _allow(out_fd, count))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _other_filesystem_tmp(tmp_path: Path) -> Path:
    """A temp folder on another file system than ``tmp_path`` when there is one (a tmpfs ``/dev/shm``, as a tmpfs
    ``/tmp`` would be), where Lightning's own save turns its rename into a copy."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        folder = shm / f"lightning_mtl_test_{os.getpid()}"
        folder.mkdir(exist_ok=True)
        return folder
    return tmp_path


def test_kill_during_a_checkpoint_write_leaves_a_complete_last_ckpt(env, tmp_path):
    run = tmp_path / "run"
    temp = _other_filesystem_tmp(tmp_path)
    args = ["--config", str(CONFIGS / "omniglot" / "protonet_5w1s_quick.yaml"), "--trainer.max_steps=200",
            "--trainer.val_check_interval=1000", "--trainer.max_time=null", "--trainer.precision=32",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--checkpoint.dirpath={run}", "--checkpoint.every_n_train_steps=2", "--data.episodes.train_ways=5",
            "--data.episodes.train_queries=2"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DISK, str(REPO / "recipes" / "fewshot.py"), "fit", *args],
                            env={**env, "TMPDIR": str(temp)}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last, seen = run / "last.ckpt", []
    try:
        for line in proc.stdout:
            seen.append(line)
            # a write into last.ckpt (or the file that replaces it) while a complete last.ckpt exists
            if line.startswith("WRITING") and "last.ckpt" in line and last.exists():
                proc.send_signal(signal.SIGKILL)
                break
        assert proc.wait(timeout=60) == -signal.SIGKILL, "no checkpoint write to interrupt:\n" + "".join(seen)[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        if temp != tmp_path:
            shutil.rmtree(temp, ignore_errors=True)
    state = torch.load(last, map_location="cpu", weights_only=True)  # complete: it unpickles
    assert state["global_step"] == 2 and "state_dict" in state and "optimizer_states" in state
