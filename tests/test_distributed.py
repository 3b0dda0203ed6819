"""utils.distributed: DDP and FSDP2 on 2 CPU processes (gloo) equal one process on the whole batch.

One real 2-process launch (torchrun, about 20 s on this 2-core machine: every process imports torch and
transformers) and the in-process world of one. Tolerances: step-0 gradients within 1e-6 (float rounding of
a sum split in two: measured 1.1e-8); weights after 3 AdamW steps within 1e-5 (measured 6.3e-7: Adam divides
by the root of the second moment, so a rounding difference in a gradient entry near zero is amplified).
"""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from utils import distributed
from utils.course import ROOT


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_world_size_one_runs_and_says_so(world_of_one):
    result = distributed.run(steps=2, expect_world_size=1)
    assert result["world_size"] == 1 and result["rows_per_rank"] == distributed.ROWS
    assert result["ddp_weight_diff"] == 0.0 and result["fsdp_weight_diff"] == 0.0
    assert result["fsdp_per_rank"] == [result["unsharded"]]  # one rank holds everything
    assert "world size 1: one process, nothing is split" in distributed.report(result)


def test_bad_input(world_of_one):
    with pytest.raises(RuntimeError, match="expected 2 processes, the launcher started 1"):
        distributed.run(steps=1, expect_world_size=2)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        distributed.run(steps=0)


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "utils.distributed", "--steps", "3", "--expect-world-size", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["fsdp_sharded"]
    assert result["ddp_grad_diff"] < 1e-6 and result["fsdp_grad_diff"] < 1e-6
    assert result["ddp_weight_diff"] < 1e-5 and result["fsdp_weight_diff"] < 1e-5
    full = result["unsharded"]
    for held in result["fsdp_per_rank"]:  # each rank holds half of every parameter, gradient and moment
        assert {k: 2 * v for k, v in held.items()} == full
    assert "world size 2" in proc.stdout and "FSDP rank 1 holds" in proc.stdout
