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


@pytest.mark.parametrize("name,balancer,level", [
    ("MTAN", "pcgrad", "parameter"),
    ("MTAN", "uncertainty", "parameter"),
    ("MMoE", "pcgrad", "parameter"),
    ("MMoE", "uncertainty", "parameter"),
    ("MMoE", "mgda", "representation"),
])
def test_ddp_two_processes_equal_single_process(name, balancer, level, tmp_path):
    # PL_GLOBAL_SEED (left by any earlier seed_everything) would make Lightning reseed the ranks differently from the
    # single process
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PL_")}, "PYTHONUNBUFFERED": "1"}
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f"{devices}.pt"
        proc = subprocess.run([sys.executable, str(WORKER), name, balancer, level, str(devices), str(out)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[devices] = torch.load(out, weights_only=True)
    assert outs[1].keys() == outs[2].keys()
    for key in outs[1]:
        torch.testing.assert_close(outs[2][key], outs[1][key], atol=1e-5, rtol=0, msg=f"{name}/{balancer}: {key}")
    initial = build(name, balancer, level=level)
    arch = initial.architecture
    names = {id(p): n for n, p in initial.named_parameters()}
    for group, params in [("shared", arch.shared_parameters()), *arch.task_parameters().items()]:
        moved = any(not torch.allclose(initial.state_dict()[names[id(p)]], outs[1][names[id(p)]]) for p in params)
        assert moved, f"training did not change the {group} parameters of {name}"
