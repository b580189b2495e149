"""Every recipe family under {1 process, 2-process gloo DDP} x {32, bf16-mixed} on CPU, on the same global batches.

Documented equivalences (docs/guarantees.md):

* fp32: two DDP processes, each on its half of every global batch, end with the parameters of one process on the
  whole batches (within 1e-5; measured <= 1e-6) for ProtoNet, second-order MAML, Reptile, multi-task loss
  weighting and gradient aggregation, and outer-loop balancing of the meta-batch (ProtoNet + PCGrad, MAML + UPGrad,
  Reptile + MGDA), and TR-MAML, whose family weights (a buffer) follow the global meta-batch's losses.
* bf16-mixed: the same first update up to bf16 rounding (within 10% of the update's largest entry; measured <= 5%).
  One process accumulates the gradients of several episodes into autocast's bf16 weight copies, DDP averages fp32
  gradients, and the order of examples in a batch differs, so bit equality is not expected.
* every run stays finite, and multi-task bf16 updates are within 2% of fp32 ones.
* Reptile with a carried inner Adam state: after a DDP meta-iteration the state is the mean of the states the ranks
  reached on their own tasks (one process carries it through all tasks in turn, so it is not compared with one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "matrix_worker.py"
sys.path.insert(0, str(WORKER.parent))
import matrix_worker  # noqa: E402

FAMILIES = ("protonet", "maml", "reptile", "mtl_uncertainty", "mtl_upgrad", "protonet_pcgrad", "maml_upgrad",
            "reptile_mgda", "tr_maml")
RUNS = [(1, "32"), (2, "32"), (1, "bf16-mixed"), (2, "bf16-mixed")]


@pytest.fixture(scope="module")
def states(tmp_path_factory) -> dict[tuple[int, str], dict]:
    out_dir = tmp_path_factory.mktemp("matrix")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK", "WORLD_SIZE"))}
    results = {}
    for devices, precision in RUNS:
        out = out_dir / f"{devices}_{precision}.pt"
        proc = subprocess.run([sys.executable, str(WORKER), str(devices), precision, str(out)], env=env,
                              cwd=out_dir, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results[devices, precision] = torch.load(out, weights_only=True)
    return results


def update(state: dict, at: str) -> dict[str, torch.Tensor]:
    return {k: state[at][k] - state["initial"][k] for k in state["initial"]}


def max_abs(d: dict[str, torch.Tensor]) -> float:
    return max(float(v.abs().max()) for v in d.values())


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max_abs({k: a[k] - b[k] for k in a}) / max_abs(b)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_ddp_equals_one_process(states, family):
    single, ddp = states[1, "32"][family], states[2, "32"][family]
    assert max_abs(update(single, "final")) > 1e-3  # training moved the weights well beyond the tolerance
    for k, v in single["final"].items():
        torch.testing.assert_close(ddp["final"][k], v, atol=1e-5, rtol=0, msg=f"{family}: {k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_ddp_first_update_equals_one_process_up_to_rounding(states, family):
    single, ddp = states[1, "bf16-mixed"][family], states[2, "bf16-mixed"][family]
    assert relative_gap(update(ddp, "first"), update(single, "first")) < 0.1


@pytest.mark.parametrize("devices,precision", RUNS)
def test_every_run_is_finite_and_trains(states, devices, precision):
    for family, state in states[devices, precision].items():
        assert all(bool(torch.isfinite(v).all()) for v in state["final"].values()), family
        assert max_abs(update(state, "final")) > 1e-4, family


@pytest.mark.parametrize("family", ["mtl_uncertainty", "mtl_upgrad"])
def test_multitask_bf16_update_is_close_to_fp32(states, family):
    bf16, fp32 = states[1, "bf16-mixed"][family], states[1, "32"][family]
    assert relative_gap(update(bf16, "first"), update(fp32, "first")) < 0.02


def test_ddp_averages_the_carried_reptile_inner_state(states):
    """Each rank adapts its own task from the same carried state; after the meta-iteration every rank holds the
    average of the states they reached (rank 0's is saved; rank 1 would otherwise keep its own)."""
    model = matrix_worker.build("reptile_carried")
    episode = matrix_worker.episodes()[0]
    reached = []
    for rank in range(2):
        replica = matrix_worker.build("reptile_carried")
        replica.load_state_dict(model.state_dict())
        part = matrix_worker.episode_slice(episode, rank, 2)
        x, y = torch.cat([part.support_x, part.query_x], 1), torch.cat([part.support_y, part.query_y], 1)
        for i in range(part.meta_batch_size):
            replica.adapt_task(x[i], y[i], 2, "train", None, carry=True)
        reached.append({k: v.clone() for k, v in replica.inner_adam.named_buffers()})
    first = states[2, "32"]["reptile_carried"]["first"]
    assert first["inner_adam.step"].item() == 2  # one task of 2 inner steps per rank
    for k in reached[0]:
        if re.search(r"features__(0|4|8|12)__bias__", k):
            # a Conv-4 conv bias feeds training-mode BatchNorm: its gradient is exactly 0, so its Adam moments hold
            # rounding noise whose value depends on the reduction order of each process, not on the averaging
            continue
        torch.testing.assert_close(first[f"inner_adam.{k}"], (reached[0][k] + reached[1][k]) / 2, atol=1e-6, rtol=1e-5,
                                   msg=k)
    assert any(not torch.equal(reached[0][k], reached[1][k]) for k in reached[0] if k != "step")
