"""2-process CPU DDP (gloo) equals one process on the global batch, for architectures with task parameters (MTAN's
attention, MMoE's gates) on every balancing path: parameter-level aggregation, loss weighting with learnt weights,
representation-level aggregation over per-task representations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_architecture_contract import build  # noqa: E402

WORKER = Path(__file__).parent / "ddp_arch_worker.py"


CASES = [
    ("MTAN", "pcgrad", "parameter"),
    ("MTAN", "uncertainty", "parameter"),
    ("MMoE", "pcgrad", "parameter"),
    ("MMoE", "uncertainty", "parameter"),
    ("MMoE", "mgda", "representation"),
]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[int, dict]:
    """Every case, trained in one single-process run and one 2-process run (launching is most of the cost)."""
    tmp = tmp_path_factory.mktemp("ddp_arch")
    # PL_GLOBAL_SEED (left by any earlier seed_everything) would make Lightning reseed the ranks differently from the
    # single process
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PL_")}, "PYTHONUNBUFFERED": "1"}
    spec = ",".join(":".join(c) for c in CASES)
    outs = {}
    for devices in (1, 2):
        out = tmp / f"{devices}.pt"
        proc = subprocess.run([sys.executable, str(WORKER), spec, str(devices), str(out)], env=env,
                              capture_output=True, text=True, timeout=600, cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[devices] = torch.load(out, weights_only=True)
    return outs


@pytest.mark.parametrize("name,balancer,level", CASES)
def test_ddp_two_processes_equal_single_process(name, balancer, level, ddp_runs):
    case = f"{name}:{balancer}:{level}"
    one, two = ddp_runs[1][case], ddp_runs[2][case]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=f"{name}/{balancer}: {key}")
    initial = build(name, balancer, level=level)
    arch = initial.architecture
    names = {id(p): n for n, p in initial.named_parameters()}
    for group, params in [("shared", arch.shared_parameters()), *arch.task_parameters().items()]:
        moved = any(not torch.allclose(initial.state_dict()[names[id(p)]], one[names[id(p)]]) for p in params)
        assert moved, f"training did not change the {group} parameters of {name}"
