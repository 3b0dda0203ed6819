"""Gradient checkpointing's price and a 2-process DDP step against one process (chapter 07).

Run alone with ``python -m benchmarks.speed``; ``python -m benchmarks.run`` (``make bench``) writes its tables into
``benchmarks/RESULTS.md``.

* **Checkpointing**, at two widths (random Llama-architecture models, 4 layers, MLP 2 x hidden, batch 4 x 128,
  fp32): the median time of a full training step (forward + backward) with transformers' non-reentrant
  checkpointing against without, the two alternating within each repeat; and the bytes autograd saves during the
  forward (``utils.memory.saved_tensor_bytes``). Theory: backward costs about twice a forward, and checkpointing
  recomputes each layer's forward once during backward, so the layers' part of a step costs about 4/3; the memory
  falls from every layer's saved tensors to each layer's input (the head is not checkpointed in either).
* **DDP**: ``torchrun --nproc_per_node 2 -m utils.distributed`` (gloo). Each rank first runs the whole batch alone
  (the one-process reference, on its own core), then DDP on its half of the batch with an all-reduce of the
  gradients every step: seconds per step of each. Half the compute per core, plus the communication: on this small
  model the two about cancel (ratios from 0.96 to 1.09 seen on a shared machine); with a large model on GPUs the
  halved compute is most of the step, which is why data parallelism pays there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from utils import memory, timing

WIDTHS = (256, 512)
BATCH, SEQ, LAYERS = 4, 128, 4


def _model(width: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=LAYERS,
                         num_attention_heads=width // 64, num_key_value_heads=width // 64,
                         max_position_embeddings=SEQ)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def bench_checkpointing(repeats: int = 7) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for width in WIDTHS:
        plain, ckpt = _model(width), _model(width)
        memory.enable_checkpointing(ckpt)
        ids = torch.randint(3, 1024, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))

        def step(m, ids=ids):
            def run():
                m.zero_grad(set_to_none=True)
                m(input_ids=ids, labels=ids).loss.backward()

            return run

        times = timing.median_seconds({"plain": step(plain), "checkpointed": step(ckpt)}, repeats=repeats)
        saved = {
            name: memory.saved_tensor_bytes(
                lambda m=m, ids=ids: m(input_ids=ids, labels=ids).loss, m.parameters()
            )[1]
            for name, m in (("plain", plain), ("checkpointed", ckpt))
        }
        rows.append(
            {
                "width": width,
                "plain_s": times["plain"],
                "ckpt_s": times["checkpointed"],
                "time_ratio": times["checkpointed"] / times["plain"],
                "plain_bytes": saved["plain"],
                "ckpt_bytes": saved["checkpointed"],
                "memory_ratio": saved["checkpointed"] / saved["plain"],
            }
        )
    return rows


def bench_ddp(steps: int = 10) -> dict:
    """One torchrun launch of utils.distributed with 2 processes; its own timing of both variants."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "utils.distributed", "--steps", str(steps), "--expect-world-size", "2", "--out", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        result = json.loads(out.read_text())
    return {
        "steps": steps,
        "world_size": result["world_size"],
        "one_process_s": result["reference_step_seconds"],
        "ddp_s": result["ddp_step_seconds"],
        "ratio": result["ddp_step_seconds"] / result["reference_step_seconds"],
    }


def speed_section(ckpt_rows: list[dict], ddp: dict) -> list[str]:
    lines = [
        "## Gradient checkpointing: time paid, memory saved (`benchmarks/speed.py`)",
        "",
        f"Random Llama-architecture models, {LAYERS} layers, batch {BATCH} x {SEQ}, fp32, one thread; transformers'",
        "non-reentrant checkpointing. Theory: about 4/3 of the layers' step time (one extra forward), saved",
        "activations from every layer's tensors to each layer's input.",
        "",
        "| hidden | step, plain (ms) | step, checkpointed (ms) | time ratio | saved, plain (MiB) | saved, checkpointed (MiB) | memory ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ckpt_rows:
        lines.append(
            f"| {r['width']} | {1e3 * r['plain_s']:.0f} | {1e3 * r['ckpt_s']:.0f} | {r['time_ratio']:.2f} | "
            f"{r['plain_bytes'] / 2**20:.1f} | {r['ckpt_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f} |"
        )
    lines += [
        "",
        "## Two processes (DDP, gloo) against one",
        "",
        f"`torchrun --nproc_per_node 2 -m utils.distributed --steps {ddp['steps']}`: world size {ddp['world_size']}, AdamW;",
        "each rank runs the whole batch alone (one process), then DDP on half of it with an all-reduce per step.",
        "",
        "| one process, whole batch (ms/step) | DDP, 2 processes (ms/step) | ratio |",
        "|---:|---:|---:|",
        f"| {1e3 * ddp['one_process_s']:.1f} | {1e3 * ddp['ddp_s']:.1f} | {ddp['ratio']:.2f} |",
        "",
    ]
    return lines


if __name__ == "__main__":
    rows, ddp = bench_checkpointing(), bench_ddp()
    print("\n".join(speed_section(rows, ddp)))
