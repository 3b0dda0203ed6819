"""LoRA speed on the CPU: the from-scratch layer against peft's, and merged inference against the base.

Run ``python -m benchmarks.run`` (``make bench``); it writes ``benchmarks/RESULTS.md``. Every comparison is
measured side by side in one process: the contenders alternate within each repeat (so a slow moment of a
shared machine hits both), and the table reports medians over the repeats. Targets:

* forward + backward of ``utils.lora.LoRALinear`` within 1.1x of peft's ``lora.Linear`` (same weights, same shapes);
* a merged model as fast as the base model (ratio 1.00 within noise): merging leaves the architecture unchanged;
* the unmerged overhead, for reference: two extra small matmuls per adapted layer.
* the training-memory estimate of ``utils.memory`` equal to the measurement (``benchmarks/memory.py``).
* gradient checkpointing's step time (about 4/3, one extra forward of the layers) and saved-activation ratio, and a
  2-process DDP step against one process (``benchmarks/speed.py``);
* every chapter's notebook within its CPU budget (``utils.course``): the wall times ``make execute`` measured.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from utils import lora, timing

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# (name, tokens per batch, d_in, d_out, rank): projections of real models at a CPU-sized token count.
LAYER_SHAPES = [
    ("Qwen2.5-0.5B q_proj", 512, 896, 896, 16),
    ("Qwen2.5-0.5B up_proj", 256, 896, 4864, 16),
    ("Qwen2.5-0.5B down_proj", 256, 4864, 896, 16),
    ("Llama-2-7B q_proj", 128, 4096, 4096, 16),
]


class _OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_layer(base: nn.Linear, rank: int, alpha: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            _OneLayer(copy.deepcopy(base)), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"])
        )
    return model.base_model.model.proj


def bench_layers(repeats: int) -> list[dict]:
    """Forward + backward (input gradient and LoRA weight gradients) of ours vs peft's lora.Linear."""
    rows = []
    for name, tokens, d_in, d_out, rank in LAYER_SHAPES:
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False)
        theirs = _peft_layer(base, rank, 2 * rank)
        ours = lora.LoRALinear(copy.deepcopy(base), rank, 2 * rank)
        with torch.no_grad():  # same adapter weights in both, and a non-zero B
            ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
            nn.init.normal_(theirs.lora_B["default"].weight, std=0.01)
            ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
        x = torch.randn(tokens, d_in, requires_grad=True)
        grad_out = torch.randn(tokens, d_out)
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5

        def step(layer, x=x, grad_out=grad_out):
            return lambda: torch.autograd.backward(layer(x), grad_out)

        t = timing.median_seconds({"ours": step(ours), "peft": step(theirs)}, repeats)
        rows.append(
            {
                "name": name,
                "shape": f"{tokens} x {d_in} -> {d_out}, r={rank}",
                **t,
                "ratio": t["ours"] / t["peft"],
            }
        )
    return rows


def bench_inference(repeats: int) -> dict:
    """Forward of a Llama-architecture model: base, merged and unloaded, merged, and unmerged LoRA on all seven
    projections (r = 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    unmerged = lora.add_lora(copy.deepcopy(base), targets, rank=16, alpha=32).eval()
    for _, layer in lora.lora_layers(unmerged):
        nn.init.normal_(layer.lora_B.weight, std=0.01)
    merged = lora.merge_lora(copy.deepcopy(unmerged))
    unloaded = lora.unload_lora(copy.deepcopy(merged))
    ids = torch.randint(0, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))

    def forward(model):
        def run():
            with torch.inference_mode():
                model(ids)

        return run

    with torch.inference_mode():
        assert (merged(ids).logits - unmerged(ids).logits).abs().max().item() < 1e-3
    models = {"base": base, "merged + unloaded": unloaded, "merged (wrapped)": merged, "unmerged": unmerged}
    t = timing.median_seconds({name: forward(m) for name, m in models.items()}, repeats)
    return {"tokens": ids.numel(), "config": config, **t}


def write_results(
    layer_rows: list[dict],
    inference: dict,
    repeats: int,
    seconds: float,
    memory_rows: list[dict] | None = None,
    speed: tuple[list[dict], dict] | None = None,
) -> str:
    base = inference["base"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks.run` (`make bench`). Medians of repeated runs, the contenders alternating",
        "inside each repeat in one process. CPU timings on a shared machine: compare ratios, not absolute times.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s); {repeats} repeats per number; the whole run took {seconds:.0f} s.",
        "",
        "## LoRA layer, forward + backward: `utils.lora.LoRALinear` vs peft's `lora.Linear`",
        "",
        "Same base weight and adapter weights in both; backward computes the input gradient and the LoRA weight",
        "gradients (the frozen weight gets none). Target: ratio <= 1.1.",
        "",
        "| layer | tokens x d_in -> d_out, rank | ours (ms) | peft (ms) | ours / peft |",
        "|---|---|---:|---:|---:|",
    ]
    for r in layer_rows:
        lines.append(
            f"| {r['name']} | {r['shape']} | {1e3 * r['ours']:.2f} | {1e3 * r['peft']:.2f} | {r['ratio']:.2f} |"
        )
    c = inference["config"]
    lines += [
        "",
        "## Inference: merged LoRA against the base model",
        "",
        f"A Llama-architecture model (hidden {c.hidden_size}, {c.num_hidden_layers} layers, MLP {c.intermediate_size}, "
        f"vocabulary {c.vocab_size}), forward pass over {inference['tokens']:,} tokens, LoRA r = 16 on all seven "
        "projections. Target: merged / base = 1.00 within noise.",
        "",
        "| model | forward (ms) | / base |",
        "|---|---:|---:|",
    ]
    for name in ("base", "merged + unloaded", "merged (wrapped)", "unmerged"):
        lines.append(f"| {name} | {1e3 * inference[name]:.1f} | {inference[name] / base:.2f} |")
    lines += [
        "",
        "*merged + unloaded*: `merge_lora` then `unload_lora`, the base architecture again (what peft's",
        "`merge_and_unload` returns). *merged (wrapped)*: merged but still inside `LoRALinear` (one extra Python call",
        "per layer). *unmerged*: two extra small matmuls per adapted layer.",
        "",
    ]
    if memory_rows:  # benchmarks/memory.py: the memory estimate against measurement
        from benchmarks.memory import memory_section

        lines += memory_section(memory_rows)
    if speed:  # benchmarks/speed.py: checkpointing's price, DDP against one process
        from benchmarks.speed import speed_section

        lines += speed_section(*speed)
    lines += notebook_budget_section()
    text = "\n".join(lines)
    RESULTS.write_text(text, encoding="utf-8")
    return text


def notebook_budget_section() -> list[str]:
    """Each written chapter's solution notebook: the wall time ``make execute`` last measured (one thread, the
    default profile) against the chapter's CPU budget from the manifest."""
    from utils import course

    measured = course.load_measurements()
    lines = [
        "",
        "## Notebooks against their CPU budgets",
        "",
        "Wall time of each solution notebook as `make execute` last measured it (default `cpu-tiny` profile, one",
        "thread; `utils/measurements.json`), against the chapter's budget in `utils/course.py`. A notebook over",
        "budget makes `make test` slower for everyone: train less, or reuse a model another section trained.",
        "",
        "| chapter | measured (s) | budget (s) | within |",
        "|---|---:|---:|---|",
    ]
    for ch in course.CHAPTERS:
        if not ch.written:
            continue
        m = measured.get(ch.id)
        if m is None:
            lines.append(f"| {ch.id} {ch.short_title} | not measured | {ch.cpu_budget_s} | |")
            continue
        ok = "yes" if m["seconds"] <= ch.cpu_budget_s else "**no**"
        lines.append(f"| {ch.id} {ch.short_title} | {m['seconds']:.0f} | {ch.cpu_budget_s} | {ok} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25, help="timed repeats per number (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from utils import env

    env.quiet_library_noise()
    start = time.time()
    layer_rows = bench_layers(args.repeats)
    inference = bench_inference(args.repeats)
    from benchmarks.memory import bench_memory

    memory_rows = bench_memory()
    from benchmarks.speed import bench_checkpointing, bench_ddp

    speed = (bench_checkpointing(), bench_ddp())
    print(write_results(layer_rows, inference, args.repeats, time.time() - start, memory_rows, speed))


if __name__ == "__main__":
    main()
