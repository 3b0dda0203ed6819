"""Chapter 10's capstone: QLoRA supervised fine-tuning end to end, as functions a notebook calls one by one
and as a script for people who train outside notebooks.

    python -m utils.capstone --profile cpu-tiny --output-dir DIR

runs the same steps as ``solutions/10_capstone.ipynb``, with a progress bar, and writes into ``DIR``:
``adapter/`` (peft's ``adapter_config.json`` + ``adapter_model.safetensors``), ``merged/`` (a standalone model in
safetensors that plain ``AutoModelForCausalLM.from_pretrained`` loads) and ``report.json`` (every figure
measured). The steps, in the fixed order of the notebook:

1. ``settings(profile)``: every knob of the run, per profile (``Settings``, each field documented);
2. ``load_rows``: the profile's instruction data (train / validation / test);
3. ``memory_estimate``: the training memory predicted by ``utils.memory`` from the config alone;
4. ``load_base``: the base in 4-bit NF4 with double quantization (``utils.quant.load_model_4bit``, which on a
   CPU also avoids bitsandbytes' AVX512-BF16 trap); ``add_lora``: ``prepare_model_for_kbit_training`` + LoRA;
5. ``train``: ``transformers.Trainer`` with evaluation, early stopping on exact match (teacher-forced argmax
   over the answer tokens, chapter 08) and ``utils.quant.LearningGuard`` (it raises when trainable tensors
   get no gradient or the loss does not move);
6. ``evaluate``: perplexity on held-out text, exact match by greedy generation, sample answers;
7. ``save_adapter`` / ``load_adapter`` (a fresh base, ``PeftModel.from_pretrained``; a base of another shape
   is refused with ``AdapterMismatchError`` naming the layer, not a size-mismatch traceback);
8. ``merge_and_save``: the 4-bit base dequantized to fp32 (``model.dequantize()``), the adapter loaded on it,
   ``merge_and_unload``, ``save_pretrained`` in safetensors; ``compare_models`` checks the merged model
   against the adapter model (largest logit difference and identical greedy answers).

Bad input: an unknown profile lists the valid ones; a GPU profile on a machine without a GPU says so and runs
``cpu-tiny`` (``utils.env.select_profile``); an output directory that exists and is not empty is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from utils import data, env, memory, metrics, quant, sft

ADAPTER_DIR, MERGED_DIR, REPORT_FILE = "adapter", "merged", "report.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# -------------------------------------------------------------------------------------------- settings


def _doc(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class Settings:
    """Every knob of one capstone run (``settings(profile)`` picks them for a profile)."""

    profile: str = _doc("the profile these settings are for")
    estimate_config: str | None = _doc(
        "architecture name for the memory estimate (utils.counting.known_config); None: the loaded model's config"
    )
    n_train: int = _doc("training conversations (the first n of the shuffled train split)")
    n_valid: int = _doc("validation conversations: eval loss and teacher-forced exact match while training")
    n_test: int = _doc("test questions for the final exact match and perplexity")
    max_length: int = _doc(
        "tokens per conversation; longer ones are cut (the answer may be lost: keep it long enough)"
    )
    max_steps: int = _doc("optimizer steps, at most (early stopping may end sooner)")
    batch_size: int = _doc("conversations per micro-batch")
    accumulation_steps: int = _doc("micro-batches per optimizer step (effective batch = batch_size x this)")
    learning_rate: float = _doc("peak AdamW learning rate (LoRA takes ~10x a full fine-tune's)")
    warmup_steps: int = _doc("linear warmup steps, then linear decay to 0")
    eval_steps: int = _doc("evaluate (and checkpoint) every this many steps")
    patience: int = _doc("early stopping: evaluations without a better exact match before stopping")
    rank: int = _doc("LoRA rank r of every adapter")
    alpha: int = _doc("LoRA alpha; the update is scaled by alpha / r")
    dropout: float = _doc("dropout on the adapter's input (0: deterministic; 0.05-0.1 on real data)")
    target_modules: str = _doc('"all-linear": LoRA on every linear layer but the head (QLoRA\'s recipe)')
    quant_type: str = _doc('4-bit code book: "nf4" (NormalFloat4, QLoRA) rather than the default "fp4"')
    double_quant: bool = _doc("quantize the quantization constants too (0.5 -> 0.127 bits per weight)")
    gradient_checkpointing: bool = _doc("recompute activations in backward: less memory, ~30% more time")
    max_new_tokens: int = _doc("tokens generated per answer when evaluating")
    seed: int = _doc("seed of data order, adapter initialization and everything else")


_GPU_RUN = dict(  # a T4: 16 GB, fp16; 4,000 conversations of up to 512 tokens, effective batch 16
    n_train=4000,
    n_valid=128,
    n_test=100,
    max_length=512,
    max_steps=400,
    batch_size=8,
    accumulation_steps=2,
    learning_rate=2e-4,
    warmup_steps=20,
    eval_steps=50,
    patience=3,
    rank=16,
    alpha=32,
    dropout=0.05,
    target_modules="all-linear",
    quant_type="nf4",
    double_quant=True,
    gradient_checkpointing=True,
    max_new_tokens=64,
    seed=0,
)

SETTINGS: dict[str, dict] = {
    "cpu-tiny": dict(
        estimate_config=None,
        n_train=640,
        n_valid=64,
        n_test=200,
        max_length=64,
        max_steps=40,
        batch_size=16,
        accumulation_steps=1,
        learning_rate=5e-3,
        warmup_steps=3,
        eval_steps=10,
        patience=2,
        rank=8,
        alpha=16,
        dropout=0.0,
        target_modules="all-linear",
        quant_type="nf4",
        double_quant=True,
        gradient_checkpointing=False,  # the tiny model's activations are small: checkpointing costs only time
        max_new_tokens=8,
        seed=0,
    ),
    "gpu-t4": dict(
        estimate_config="qwen2.5-0.5b",
        **_GPU_RUN,
    ),
    "gpu-small": dict(  # the course's other GPU profile (SmolLM2-135M-Instruct): the same run, a smaller model
        estimate_config="smollm2-135m",
        **_GPU_RUN,
    ),
}


def settings(profile) -> Settings:
    """The ``Settings`` of a profile (a ``utils.env.Profile`` or its name); an unknown name lists the valid ones."""
    name = getattr(profile, "name", profile)
    if name not in SETTINGS:
        raise ValueError(
            f"Unknown profile {name!r}: the capstone runs with {', '.join(map(repr, SETTINGS))}."
        )
    return Settings(profile=name, **SETTINGS[name])


def describe(cfg: Settings) -> str:
    """One line per setting: name, value, what it does."""
    return "\n".join(f"{f.name:22s} {getattr(cfg, f.name)!s:14s} # {f.metadata['help']}" for f in fields(cfg))


def resolve_profile(name: str):
    """``utils.env.select_profile(name)`` restricted to the capstone's profiles: an unknown name lists the valid
    ones; a GPU profile on a machine without a GPU explains and falls back to ``cpu-tiny``."""
    if name not in SETTINGS:
        raise ValueError(
            f"Unknown profile {name!r}: the capstone runs with {', '.join(map(repr, SETTINGS))}."
        )
    return env.select_profile(name)


def prepare_output_dir(path: str | Path) -> Path:
    """``path`` created if missing; refused (``FileExistsError``) if it exists and holds anything: a learner's
    earlier run is never overwritten silently."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file, not a directory: choose another --output-dir.")
    if path.is_dir() and any(path.iterdir()):
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise FileExistsError(
            f"{path} is not empty ({listing}): the capstone will not overwrite an earlier run. Choose a new "
            "--output-dir, or delete this one yourself if you no longer need it."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------ data, memory


def load_rows(profile, cfg: Settings) -> dict[str, list[dict]]:
    """``{"train", "validation", "test"}``: lists of rows with a ``messages`` column (train shuffled with the
    seed, each cut to its size in ``cfg``)."""
    train_rows = profile.load_instructions("train").shuffle(seed=cfg.seed)
    return {
        "train": list(train_rows.select(range(min(cfg.n_train, len(train_rows))))),
        "validation": list(profile.load_instructions("validation"))[: cfg.n_valid],
        "test": list(profile.load_instructions("test"))[: cfg.n_test],
    }


def heldout_texts(profile, rows: dict[str, list[dict]], limit: int = 200) -> list[str]:
    """Held-out text for perplexity: the course's validation biographies (cpu-tiny), else test answers."""
    if profile.dataset_id is None:
        return data.load_corpus("valid")[:limit]
    return [r["messages"][-1]["content"] for r in rows["test"]][:limit]


def memory_estimate(cfg: Settings, model_config=None) -> memory.TrainingMemory:
    """Bytes of one QLoRA training step predicted from the config alone (``utils.memory``): a 4-bit NF4 base,
    fp32 adapters on every linear layer, AdamW, ``batch_size x max_length`` tokens. ``precision`` is "fp32"
    on a CPU (fp32 compute and the fp32 norms/embedding of ``prepare_model_for_kbit_training``) and "mixed"
    for a GPU profile (16-bit compute)."""
    config = model_config if cfg.estimate_config is None else cfg.estimate_config
    return memory.estimate_training_memory(
        config,
        "qlora",
        rank=cfg.rank,
        target_modules=cfg.target_modules,
        batch_size=cfg.batch_size,
        seq_len=cfg.max_length,
        precision="fp32" if cfg.estimate_config is None else "mixed",
        gradient_checkpointing=cfg.gradient_checkpointing,
        double_quant=cfg.double_quant,
    )


# ------------------------------------------------------------------------------------------ model, LoRA


def load_base(profile, cfg: Settings):
    """``(model, tokenizer, quantized)``: the profile's base in 4-bit (``quant.load_model_4bit``: NF4, double
    quantization, compute in the profile's 16-bit dtype on a GPU and fp32 on a CPU; on a CPU every Linear4bit
    is made safe to train after an evaluation). ``quantized`` is False when bitsandbytes cannot run 4-bit
    here (it then printed why and loaded the model unquantized: plain LoRA)."""
    compute_dtype = profile.autocast_dtype or torch.float32
    return quant.load_model_4bit(
        profile.model_id,
        device=profile.device,
        quant_type=cfg.quant_type,
        double_quant=cfg.double_quant,
        compute_dtype=compute_dtype,
    )


def lora_config(cfg: Settings):
    """The ``peft.LoraConfig`` of the run."""
    import peft

    return peft.LoraConfig(
        r=cfg.rank,  # rank of every adapter pair (A: r x d_in, B: d_out x r)
        lora_alpha=cfg.alpha,  # the update B @ A is scaled by alpha / r
        lora_dropout=cfg.dropout,  # dropout on the adapter's input only
        target_modules=cfg.target_modules,  # "all-linear": every nn.Linear / Linear4bit except the LM head
        bias="none",  # biases stay frozen
        task_type="CAUSAL_LM",  # a causal LM: peft wraps it in PeftModelForCausalLM
    )


def add_lora(model, cfg: Settings):
    """``prepare_model_for_kbit_training`` (freeze the base, unquantized parameters to fp32, optional gradient
    checkpointing) then ``get_peft_model`` with ``lora_config(cfg)``, adapters initialized with the seed."""
    import peft

    if getattr(model, "is_loaded_in_4bit", False):
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    env.seed_everything(cfg.seed)
    return peft.get_peft_model(model, lora_config(cfg))


# ------------------------------------------------------------------------------------------------ train


def tokenized(tokenizer, rows: list[dict], cfg: Settings):
    """Rows tokenized with the chat template, the prompt masked (-100), as a ``datasets.Dataset``."""
    from datasets import Dataset

    return Dataset.from_list(sft.tokenize_rows(tokenizer, rows, max_length=cfg.max_length))


def argmax_only(logits, labels):
    """``Trainer(preprocess_logits_for_metrics=...)``: keep the (batch, seq) argmax ids, not the logits."""
    return logits.argmax(-1)


def answer_scores(eval_pred) -> dict[str, float]:
    """``Trainer(compute_metrics=...)``: teacher-forced token accuracy and exact match over the answer tokens
    (labels != -100), after the one-position shift; a row counts when every answer token is the argmax. With
    greedy decoding this is the exact match of generation, up to normalization (chapter 08)."""
    preds, labels = eval_pred.predictions[:, :-1], eval_pred.label_ids[:, 1:]
    scored = labels != sft.IGNORE_INDEX
    right = preds == labels
    return {
        "token_accuracy": float(right[scored].mean()),
        "exact_match": float((right | ~scored).all(axis=1).mean()),
    }


def _guard_callback(guard: quant.LearningGuard):
    from transformers import TrainerCallback

    class LearningGuardCallback(TrainerCallback):
        """Runs ``guard(step, loss)`` after each backward pass, before the optimizer step (gradients are there)."""

        loss = float("nan")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            guard(state.global_step + 1, self.loss)

    return LearningGuardCallback()


def guarded(trainer_cls):
    """A subclass of ``trainer_cls`` (``Trainer``, ``trl.SFTTrainer``) taking ``guard=LearningGuard(model)``:
    the guard sees every step's gradients and loss and raises ``quant.NotLearningError`` when training would
    go on without learning."""

    class Guarded(trainer_cls):
        def __init__(self, *args, guard: quant.LearningGuard, callbacks=None, **kwargs):
            self.guard_callback = _guard_callback(guard)
            super().__init__(*args, callbacks=[*(callbacks or []), self.guard_callback], **kwargs)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.guard_callback.loss = float(loss.detach()) * self.args.gradient_accumulation_steps
            return loss

    Guarded.__name__ = f"Guarded{trainer_cls.__name__}"
    return Guarded


def learning_guard(model, cfg: Settings) -> quant.LearningGuard:
    """``quant.LearningGuard`` for a ``Trainer`` run. Trainer's warmup starts at learning rate 0 (step 1 of a
    linear warmup is 0 / warmup_steps), so the first update leaves LoRA's B at zero and A's gradient is still
    exactly zero at step 2: with warmup the guard allows two steps of grace instead of one."""
    return quant.LearningGuard(model, grace_steps=2 if cfg.warmup_steps > 0 else 1)


def training_arguments(cfg: Settings, output_dir: str | Path, profile, progress: bool = False, **overrides):
    """The ``TrainingArguments`` of the run: evaluate and checkpoint every ``eval_steps``, keep the best
    exact match, 16-bit autocast as the profile says (fp16 on a T4, bf16 on Ampere and newer, none on CPU)."""
    from transformers import TrainingArguments

    autocast = profile.autocast_dtype
    kwargs = dict(
        output_dir=str(output_dir),  # checkpoints go here (a fresh folder per run)
        max_steps=cfg.max_steps,  # optimizer steps at most
        per_device_train_batch_size=cfg.batch_size,  # micro-batch
        per_device_eval_batch_size=cfg.batch_size * 2,  # no gradients at evaluation: twice as many fit
        gradient_accumulation_steps=cfg.accumulation_steps,  # micro-batches per optimizer step
        learning_rate=cfg.learning_rate,  # peak learning rate of AdamW
        lr_scheduler_type="linear",  # warmup, then linear decay to 0
        warmup_steps=cfg.warmup_steps,  # linear warmup
        weight_decay=0.0,  # none on the adapters
        max_grad_norm=1.0,  # clip the gradient norm
        optim="adamw_torch",  # torch AdamW (paged_adamw_8bit saves memory on CUDA)
        eval_strategy="steps",  # evaluate every eval_steps ...
        eval_steps=cfg.eval_steps,
        save_strategy="steps",  # ... and checkpoint at the same steps (early stopping needs both)
        save_steps=cfg.eval_steps,
        save_total_limit=1,  # keep only the best checkpoint (plus the last)
        save_only_model=True,  # the adapter only, no optimizer state: smaller, and all the best model needs
        load_best_model_at_end=True,  # reload the best evaluation's weights when training ends
        metric_for_best_model="exact_match",  # best = highest teacher-forced exact match ...
        greater_is_better=True,  # ... higher is better
        logging_steps=max(1, cfg.eval_steps // 2),  # training loss every few steps
        fp16=autocast == torch.float16,  # T4: fp16 autocast with loss scaling
        bf16=autocast == torch.bfloat16,  # Ampere and newer: bf16 autocast
        use_cpu=profile.device.type == "cpu",  # no GPU: train on the CPU
        report_to="none",  # no tracking service
        disable_tqdm=not progress,  # the progress bar (the script shows it)
        seed=cfg.seed,  # data order and dropout
        log_level="error",  # keep the notebook's output to the table we print
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(
    model, tokenizer, rows: dict[str, list[dict]], cfg: Settings, output_dir, profile, progress: bool = False
):
    """Train ``model`` (a PeftModel) with ``Trainer``: early stopping on exact match (patience ``cfg.patience``),
    the best evaluation's adapter reloaded at the end, every step watched by ``quant.LearningGuard``.
    Returns the trainer (``trainer.state.log_history`` holds the losses and evaluations)."""
    from transformers import EarlyStoppingCallback, Trainer

    trainer = guarded(Trainer)(
        model=model,
        args=training_arguments(cfg, output_dir, profile, progress),
        train_dataset=tokenized(tokenizer, rows["train"], cfg),
        eval_dataset=tokenized(tokenizer, rows["validation"], cfg),
        data_collator=lambda features: sft.collate(features, tokenizer.pad_token_id),
        compute_metrics=answer_scores,
        preprocess_logits_for_metrics=argmax_only,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=cfg.patience)],
        guard=learning_guard(model, cfg),
    )
    env.seed_everything(cfg.seed)
    with contextlib.redirect_stdout(io.StringIO()) if not progress else contextlib.nullcontext():
        trainer.train()
    return trainer


def history(trainer) -> dict[str, list]:
    """``{"train": [(step, loss)], "eval": [(step, eval_loss, exact_match)]}`` from a trainer's log."""
    logs = trainer.state.log_history
    return {
        "train": [(h["step"], h["loss"]) for h in logs if "loss" in h and "eval_loss" not in h],
        "eval": [(h["step"], h["eval_loss"], h.get("eval_exact_match")) for h in logs if "eval_loss" in h],
    }


# --------------------------------------------------------------------------------------------- evaluate


def prompts_of(rows: list[dict]) -> list[str]:
    """The first user message of each row."""
    return [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]


@torch.no_grad()
def answer_perplexity(model, tokenizer, rows: list[dict], cfg: Settings, batch_size: int = 64) -> float:
    """exp(mean NLL of the assistant's tokens) of held-out conversations: the prompt is given, only the answer
    (and its end token) is scored, each token once, padding excluded."""
    model.eval()
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    examples = sft.tokenize_rows(tokenizer, rows, max_length=cfg.max_length)
    for start in range(0, len(examples), batch_size):
        batch = sft.collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        labels = batch.pop("labels")[:, 1:].to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=sft.IGNORE_INDEX, reduction="sum"
        ).item()
        n += int((labels != sft.IGNORE_INDEX).sum())
    return math.exp(nll / n)


def evaluate(model, tokenizer, rows: list[dict], texts: list[str], cfg: Settings) -> dict:
    """``{"answer_perplexity", "perplexity", "exact_match", "answers"}``: perplexity of the answers of held-out
    conversations ``rows``, perplexity of held-out plain ``texts`` (what pretraining taught: forgetting shows
    here), greedy exact match on ``rows`` and the greedy answers themselves (for side-by-side samples)."""
    answers = metrics.generate_answers(model, tokenizer, prompts_of(rows), max_new_tokens=cfg.max_new_tokens)
    references = [r["messages"][-1]["content"] for r in rows]
    hits = [
        metrics.normalize_answer(a) == metrics.normalize_answer(r)
        for a, r in zip(answers, references, strict=True)
    ]
    return {
        "answer_perplexity": answer_perplexity(model, tokenizer, rows, cfg),
        "perplexity": metrics.perplexity(model, tokenizer, texts),
        "exact_match": sum(hits) / len(hits),
        "answers": answers,
    }


# ----------------------------------------------------------------------------------- save, reload, merge


def file_bytes(directory: str | Path) -> dict[str, int]:
    """``{file name: bytes}`` of every file in ``directory`` (not recursive)."""
    return {p.name: p.stat().st_size for p in sorted(Path(directory).iterdir()) if p.is_file()}


def save_adapter(model, directory: str | Path) -> dict[str, int]:
    """``model.save_pretrained(directory)`` of a PeftModel: only the adapter (config + safetensors). Returns
    the files and their sizes in bytes."""
    model.save_pretrained(str(directory))
    return file_bytes(directory)


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the base model it is being loaded onto."""


def adapter_mismatches(base, adapter_dir: str | Path) -> list[str]:
    """What does not fit between the adapter in ``adapter_dir`` and ``base`` (empty when it fits): every
    adapted layer must exist in ``base`` with ``lora_A``'s input size = the layer's ``in_features`` and
    ``lora_B``'s output size = its ``out_features``. Reads the safetensors header only."""
    from safetensors import safe_open

    from utils import lora

    shapes = {}
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            shapes[key] = tuple(f.get_slice(key).get_shape())
    modules = dict(base.named_modules())
    problems = []
    for key, shape in sorted(shapes.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        kind = "lora_A" if ".lora_A." in key else "lora_B"
        name = key.split(f".{kind}.")[0].removeprefix(lora.PEFT_PREFIX)
        layer = modules.get(name)
        if layer is None:
            problems.append(f"{name}: the adapter has it, the base model has no such layer")
            continue
        d_in, d_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if kind == "lora_A" and d_in is not None and shape[1] != d_in:
            problems.append(
                f"{name}: the adapter's lora_A expects {shape[1]} inputs, the base layer has {d_in}"
            )
        if kind == "lora_B" and d_out is not None and shape[0] != d_out:
            problems.append(
                f"{name}: the adapter's lora_B gives {shape[0]} outputs, the base layer has {d_out}"
            )
    return problems


def load_adapter(base, adapter_dir: str | Path, is_trainable: bool = False):
    """``PeftModel.from_pretrained(base, adapter_dir)`` after checking that the adapter fits ``base``: a base of
    another architecture or size raises ``AdapterMismatchError`` naming the first layers that do not fit and
    the base the adapter was trained on, instead of a size-mismatch traceback from deep inside torch."""
    import peft

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).exists():
        raise FileNotFoundError(
            f"No {ADAPTER_WEIGHTS} in {adapter_dir}: save the adapter with save_adapter first."
        )
    problems = adapter_mismatches(base, adapter_dir)
    if problems:
        trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        base_name = getattr(base.config, "_name_or_path", "") or type(base).__name__
        shown = "\n  ".join(problems[:3]) + (
            f"\n  ... and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise AdapterMismatchError(
            f"The adapter in {adapter_dir} was trained on {trained_on!r} and does not fit this base model "
            f"({base_name!r}, hidden size {getattr(base.config, 'hidden_size', '?')}):\n  {shown}\n"
            "Load the base the adapter was trained on (adapter_config.json, base_model_name_or_path)."
        )
    return peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)


def dequantized_base(profile, cfg: Settings):
    """A fresh 4-bit base dequantized to fp32 (``model.dequantize()``): exactly the weights the 4-bit model
    computes with (on a CPU with fp32 compute), as ordinary ``nn.Linear`` layers a merge can add to."""
    model, tokenizer, quantized = load_base(profile, cfg)
    if quantized:
        model = model.dequantize(dtype=torch.float32)
    return model, tokenizer


def merge_and_save(profile, cfg: Settings, adapter_dir: str | Path, directory: str | Path) -> dict[str, int]:
    """The standalone model: a fresh base dequantized to fp32, the adapter loaded on it and merged
    (``merge_and_unload``: W <- W + (alpha / r) B A, adapters removed), saved with ``save_pretrained`` in
    safetensors with its tokenizer. Returns the files and their sizes in bytes."""
    base, tokenizer = dequantized_base(profile, cfg)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    if hasattr(merged.config, "quantization_config"):  # the weights are plain fp32 now
        del merged.config.quantization_config
    merged.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return file_bytes(directory)


def load_merged(directory: str | Path, device="cpu"):
    """``(model, tokenizer)`` with plain ``AutoModelForCausalLM`` / ``AutoTokenizer``: nothing of peft needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).to(device)
    return model, AutoTokenizer.from_pretrained(str(directory))


@torch.no_grad()
def compare_models(model_a, model_b, tokenizer, rows: list[dict], cfg: Settings) -> dict:
    """``{"max_logit_diff", "same_answers", "answers_a", "answers_b"}``: the largest absolute logit difference on
    the rows' tokenized conversations and whether greedy answers to their prompts are identical."""
    batch = sft.collate(sft.tokenize_rows(tokenizer, rows, max_length=cfg.max_length), tokenizer.pad_token_id)
    batch.pop("labels")
    diffs = []
    for m in (model_a, model_b):
        m.eval()
    device = next(model_a.parameters()).device
    la = model_a(**{k: v.to(device) for k, v in batch.items()}).logits.float()
    lb = model_b(**{k: v.to(next(model_b.parameters()).device) for k, v in batch.items()}).logits.float()
    mask = batch["attention_mask"].bool()
    diffs = (la.cpu() - lb.cpu()).abs()[mask]
    answers_a = metrics.generate_answers(model_a, tokenizer, prompts_of(rows), cfg.max_new_tokens)
    answers_b = metrics.generate_answers(model_b, tokenizer, prompts_of(rows), cfg.max_new_tokens)
    return {
        "max_logit_diff": float(diffs.max()),
        "same_answers": answers_a == answers_b,
        "answers_a": answers_a,
        "answers_b": answers_b,
    }


# ------------------------------------------------------------------------------------------------ script


def run(profile_name: str, output_dir: str | Path, progress: bool = True, **overrides) -> dict:
    """Every step of the capstone; writes ``adapter/``, ``merged/`` and ``report.json`` into ``output_dir``
    (which must be new or empty). ``overrides`` replace settings (tests shorten the run). Returns the report."""
    from dataclasses import replace

    out = prepare_output_dir(output_dir)
    started = time.perf_counter()
    profile = resolve_profile(profile_name)
    cfg = replace(settings(profile), **overrides)
    steps = [
        "data",
        "memory",
        "load 4-bit",
        "LoRA",
        "train",
        "evaluate",
        "save adapter",
        "reload",
        "merge",
        "check merged",
    ]
    bar = _progress(len(steps), progress)

    def step(name):
        bar.set_description(name)
        bar.update(1)

    rows = load_rows(profile, cfg)
    texts = heldout_texts(profile, rows)
    step("data")
    model, tokenizer, quantized = load_base(profile, cfg)
    estimate = memory_estimate(cfg, model.config)
    step("memory")
    before = evaluate(model, tokenizer, rows["test"], texts, cfg)
    step("load 4-bit")
    model = add_lora(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    step("LoRA")
    if profile.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = train(model, tokenizer, rows, cfg, out / "checkpoints", profile, progress=False)
    log = history(trainer)
    peak = env.peak_memory_gib(profile.device)
    step("train")
    after = evaluate(model, tokenizer, rows["test"], texts, cfg)
    step("evaluate")
    adapter_files = save_adapter(model, out / ADAPTER_DIR)
    step("save adapter")
    fresh, _, _ = load_base(profile, cfg)
    reloaded = compare_models(
        model, load_adapter(fresh, out / ADAPTER_DIR), tokenizer, rows["test"][:32], cfg
    )
    step("reload")
    merged_files = merge_and_save(profile, cfg, out / ADAPTER_DIR, out / MERGED_DIR)
    step("merge")
    merged_model, _ = load_merged(out / MERGED_DIR, profile.device)
    merged = compare_models(model, merged_model, tokenizer, rows["test"][:32], cfg)
    step("check merged")
    bar.close()
    _remove_checkpoints(out / "checkpoints")
    report = {
        "profile": profile.name,
        "settings": asdict(cfg),
        "quantized_4bit": quantized,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "memory_estimate_bytes": estimate.as_dict(),
        "peak_memory_gib": peak,
        "steps_trained": trainer.state.global_step,
        "best_step": trainer.state.best_global_step,
        "best_eval_exact_match": trainer.state.best_metric,
        "train_loss": log["train"],
        "eval": log["eval"],
        "before": {k: before[k] for k in ("answer_perplexity", "perplexity", "exact_match")},
        "after": {k: after[k] for k in ("answer_perplexity", "perplexity", "exact_match")},
        "samples": [
            {"prompt": p, "before": b, "after": a, "reference": r["messages"][-1]["content"]}
            for p, b, a, r in zip(
                prompts_of(rows["test"][:5]), before["answers"], after["answers"], rows["test"], strict=False
            )
        ],
        "adapter_bytes": adapter_files,
        "merged_bytes": merged_files,
        "reloaded_max_logit_diff": reloaded["max_logit_diff"],
        "reloaded_same_answers": reloaded["same_answers"],
        "merged_max_logit_diff": merged["max_logit_diff"],
        "merged_same_answers": merged["same_answers"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def _remove_checkpoints(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.capstone", description="QLoRA SFT end to end: train, evaluate, save, merge."
    )
    parser.add_argument(
        "--profile", default="cpu-tiny", help=f"one of {', '.join(SETTINGS)} (default cpu-tiny)"
    )
    parser.add_argument(
        "--output-dir", required=True, help="a new or empty directory for the adapter, model, report"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="override the profile's optimizer steps")
    parser.add_argument("--n-test", type=int, default=None, help="override the number of test questions")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1: results repeat exactly)"
    )
    args = parser.parse_args(argv)
    if args.profile not in SETTINGS:
        parser.error(f"unknown profile {args.profile!r}: choose one of {', '.join(SETTINGS)}")
    out = Path(args.output_dir)
    try:
        prepare_output_dir(out)
    except FileExistsError as err:
        parser.error(str(err))
    env.quiet_library_noise()
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("n_test", args.n_test)) if v is not None}
    report = run(args.profile, out, progress=True, **overrides)
    print(
        f"{report['profile']}: {report['steps_trained']} steps, exact match {report['before']['exact_match']:.1%} "
        f"-> {report['after']['exact_match']:.1%}, answer perplexity {report['before']['answer_perplexity']:.1f} -> "
        f"{report['after']['answer_perplexity']:.2f}; adapter {sum(report['adapter_bytes'].values()):,} bytes, merged model "
        f"{sum(report['merged_bytes'].values()):,} bytes; merged answers identical: {report['merged_same_answers']}\n"
        f"wrote {out / ADAPTER_DIR}, {out / MERGED_DIR}, {out / REPORT_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
