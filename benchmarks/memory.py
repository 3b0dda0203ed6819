"""The memory estimate against measurement at three model widths (``utils.memory``).

Run alone with ``python -m benchmarks.memory``; ``python -m benchmarks.run`` (``make bench``) writes its table into
``benchmarks/RESULTS.md``. Each model is a random Llama-architecture model built from a ``LlamaConfig`` (4 layers,
MLP 2 x hidden, vocabulary 1,024, one head per 64 dimensions), trained one step on a batch of 4 x 128 tokens (at
hidden 512 and 8 x 256 tokens the comparison is exact too, 308.5 MiB of activations, but slow to run every time).
A bf16 step is slow on this CPU (about 18 s at hidden 512), so bf16 runs at the two smaller widths only. For each,
``estimate_training_memory`` from the config alone and ``measure_training_memory`` on the model (parameters,
gradients after ``backward()``, optimizer state after one AdamW ``step()``, tensors saved for backward). Target:
ratio 1.00 for every component (the estimate is exact on this stack; tests/test_memory.py allows 10% on activations).
"""

from __future__ import annotations

import time

import torch

from utils import memory

WIDTHS = (128, 256, 512)
BATCH, SEQ = 4, 128
# (label, method, precision, gradient checkpointing, largest width it runs at)
CASES = (
    ("full, fp32", "full", "fp32", False, 512),
    ("full, bf16", "full", "bf16", False, 256),
    ("LoRA r=8 q,v, fp32", "lora", "fp32", False, 512),
    ("full, fp32, checkpointing", "full", "fp32", True, 512),
)
COMPONENTS = ("weights", "gradients", "optimizer", "activations")


def _model(width: int, method: str, precision: str, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=4,
                         num_attention_heads=width // 64, num_key_value_heads=width // 64,
                         max_position_embeddings=SEQ)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32 if precision == "fp32" else torch.bfloat16)
    if checkpointing:
        model.activation_checkpointing_enable()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    return config, model


def bench_memory(widths: tuple[int, ...] = WIDTHS) -> list[dict]:
    """One row per (width, case): the estimate, the measurement and their ratio, per component, in bytes."""
    rows = []
    ids = torch.randint(0, 1024, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    for width in widths:
        for label, method, precision, checkpointing, max_width in CASES:
            if width > max_width:
                continue
            config, model = _model(width, method, precision, checkpointing)
            start = time.perf_counter()
            measured = memory.measure_training_memory(model, ids, inplace=True)
            seconds = time.perf_counter() - start
            estimate = memory.estimate_training_memory(
                config, method, batch_size=BATCH, seq_len=SEQ, precision=precision,
                gradient_checkpointing=checkpointing,
            )  # fmt: skip
            row = {"width": width, "case": label, "params": measured.n_params, "seconds": seconds}
            for c in COMPONENTS:
                e = getattr(estimate, c) - (estimate.recompute if c == "activations" else 0)
                m = getattr(measured, c)
                row[c] = {"estimate": e, "measured": m, "ratio": e / m if m else float(e == 0)}
            rows.append(row)
            del model
    return rows


def memory_section(rows: list[dict]) -> list[str]:
    """The Markdown lines of the RESULTS.md section."""
    lines = [
        "## Training memory: `utils.memory` estimate against measurement",
        "",
        f"Random Llama-architecture models (4 layers, MLP 2 x hidden, vocabulary 1,024), one AdamW step on {BATCH} x "
        f"{SEQ} tokens. Estimate from the config alone; measured: parameter storages, `.grad` after `backward()`,",
        "`optimizer.state` after `step()`, tensors saved for backward (saved-tensor hooks, each storage once). Under",
        "checkpointing the estimate's one recomputed layer (live only during backward) is left out of the comparison.",
        "Target: estimate / measured = 1.00 for every component.",
        "",
        "| hidden | case | params | measured activations (MiB) | weights | gradients | optimizer | activations |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratios = " | ".join(f"{r[c]['ratio']:.4f}" for c in COMPONENTS)
        lines.append(
            f"| {r['width']} | {r['case']} | {r['params']:,} | {r['activations']['measured'] / 2**20:.1f} | {ratios} |"
        )
    lines.append("")
    return lines


def main() -> None:
    torch.set_num_threads(1)
    from utils import env

    env.quiet_library_noise()
    start = time.time()
    rows = bench_memory()
    print("\n".join(memory_section(rows)))
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
