"""Chapter 07's distributed demo: one training run as several processes on this CPU (gloo), against one.

Run it with torchrun (each process gets RANK, WORLD_SIZE and a rendezvous address from it):

    torchrun --standalone --nproc_per_node 2 -m utils.distributed --steps 3 --out result.json

(``python -m torch.distributed.run`` is the same launcher.) Every process builds the same small random Llama
and the same batch of ``ROWS x SEQ`` token ids, then:

* **reference**: each process trains its own copy on the *whole* batch for ``steps`` AdamW steps (what one
  device would do);
* **DDP** (``DistributedDataParallel``): each rank trains on its slice of the batch; backward all-reduces
  (averages) the gradients, so every rank applies the same update. Equal to the reference up to float
  rounding, because every slice holds the same number of target tokens (the mean of equal-size means is the
  mean; with uneven token counts it is not, chapter 07's accumulation section);
* **FSDP2** (``torch.distributed.fsdp.fully_shard`` on each decoder layer, then on the model): each rank keeps
  only its shard of every parameter, gradient and optimizer moment; the forward pass all-gathers a layer's
  weights when it needs them, backward reduce-scatters the gradients. Reported: the bytes each rank holds
  against the unsharded model, and the gathered weights against the reference.

The world size and what is sharded are printed and checked (``--expect-world-size``): some launch commands
silently run one process (see chapter 07). A world size of 1 still runs and says that nothing is split.
``run(...)`` is the same thing inside an already initialized process group (the tests call it in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROWS, SEQ = 8, 32  # the whole batch: 8 sequences of 32 tokens, every one a target (no padding)
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
LR = 1e-3
EPS = 1e-6


def build_model(seed: int = 0):
    """The same small random Llama on every rank (same seed, same initialization)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def whole_batch(seed: int = 1) -> torch.Tensor:
    """(ROWS, SEQ) token ids, the same on every rank."""
    return torch.randint(0, CONFIG["vocab_size"], (ROWS, SEQ), generator=torch.Generator().manual_seed(seed))


def _train(model, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], float]:
    """``steps`` AdamW steps on ``ids``; returns the first step's gradients and the mean step time."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    first_grads: list[torch.Tensor] = []
    start = time.perf_counter()
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            first_grads = [_full(p.grad).clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return first_grads, (time.perf_counter() - start) / steps


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameter or gradient) gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (its own shard of a DTensor)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b, strict=True))


def run(steps: int = 3, expect_world_size: int | None = None) -> dict:
    """The demo inside an initialized process group; returns the results (the same on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    rank, world = dist.get_rank(), dist.get_world_size()
    if expect_world_size is not None and world != expect_world_size:
        raise RuntimeError(
            f"expected {expect_world_size} processes, the launcher started {world}: check the launch command "
            "(some accelerate options silently run one process)."
        )
    if ROWS % world:
        raise ValueError(f"the batch of {ROWS} rows does not split evenly over {world} processes.")
    ids = whole_batch()
    local = ids.chunk(world)[rank]  # this rank's slice: ROWS / world rows

    reference = build_model()
    ref_grads, ref_seconds = _train(reference, ids, steps)
    ref_weights = [p.detach() for p in reference.parameters()]

    ddp = DDP(build_model())
    ddp_grads, ddp_seconds = _train(ddp, local, steps)
    ddp_weights = [p.detach() for p in ddp.module.parameters()]

    fsdp = build_model()
    full_param_bytes = _local_bytes(fsdp.parameters())
    mesh = init_device_mesh("cpu", (world,))
    for layer in fsdp.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    sharded = all(hasattr(p, "to_local") for p in fsdp.parameters())
    param_bytes = _local_bytes(fsdp.parameters())
    opt = torch.optim.AdamW(fsdp.parameters(), lr=LR, eps=EPS)
    fsdp_grads, grad_bytes, optim_bytes = [], 0, 0
    for step in range(steps):
        fsdp(input_ids=local, labels=local).loss.backward()
        if step == 0:
            grad_bytes = _local_bytes(p.grad for p in fsdp.parameters())
            fsdp_grads = [_full(p.grad).clone() for p in fsdp.parameters()]
        opt.step()
        if step == 0:
            moments = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
            optim_bytes = _local_bytes(moments)
        opt.zero_grad(set_to_none=True)
    fsdp_weights = [_full(p).detach() for p in fsdp.parameters()]

    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"param_bytes": param_bytes, "grad_bytes": grad_bytes,
                                      "optim_bytes": optim_bytes})  # fmt: skip
    return {
        "world_size": world,
        "backend": dist.get_backend(),
        "rows_per_rank": len(local),
        "steps": steps,
        "n_params": sum(p.numel() for p in reference.parameters()),
        "unsharded": {
            "param_bytes": full_param_bytes,
            "grad_bytes": full_param_bytes,
            "optim_bytes": 2 * full_param_bytes,
        },  # fmt: skip
        "fsdp_per_rank": per_rank,
        "fsdp_sharded": sharded,
        "ddp_grad_diff": _max_diff(ddp_grads, ref_grads),
        "ddp_weight_diff": _max_diff(ddp_weights, ref_weights),
        "fsdp_grad_diff": _max_diff(fsdp_grads, ref_grads),
        "fsdp_weight_diff": _max_diff(fsdp_weights, ref_weights),
        "reference_step_seconds": ref_seconds,
        "ddp_step_seconds": ddp_seconds,
    }


def report(result: dict) -> str:
    """The lines rank 0 prints."""
    world = result["world_size"]
    lines = [f"world size {world} | backend {result['backend']} | {result['rows_per_rank']} of {ROWS} rows "
             f"per rank | {result['n_params']:,} parameters | {result['steps']} AdamW steps"]  # fmt: skip
    if world == 1:
        lines.append("world size 1: one process, nothing is split, averaged or sharded (launch with "
                     "torchrun --nproc_per_node 2 to see two)")  # fmt: skip
    lines.append(f"DDP  vs one process on the whole batch: step-0 gradients max diff {result['ddp_grad_diff']:.1e}, "
                 f"weights after {result['steps']} steps {result['ddp_weight_diff']:.1e}")  # fmt: skip
    lines.append(f"FSDP vs one process on the whole batch: step-0 gradients max diff {result['fsdp_grad_diff']:.1e}, "
                 f"weights after {result['steps']} steps {result['fsdp_weight_diff']:.1e}")  # fmt: skip
    full = result["unsharded"]
    for rank, held in enumerate(result["fsdp_per_rank"]):
        parts = [f"{k.split('_')[0]} {held[k]:,} of {full[k]:,} bytes" for k in ("param_bytes", "grad_bytes",
                                                                                    "optim_bytes")]  # fmt: skip
        lines.append(f"FSDP rank {rank} holds: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--expect-world-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="rank 0 writes the results here as JSON")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:  # started without torchrun: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result = run(args.steps, args.expect_world_size)
        if dist.get_rank() == 0:
            print(report(result), flush=True)
            if args.out is not None:
                args.out.write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
