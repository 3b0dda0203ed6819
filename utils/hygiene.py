"""Chapter 08's reusable pieces: a small ``Trainer`` run that checkpoints, and the script that a notebook
starts in a subprocess and kills part-way to show resuming after an interruption.

``python -m utils.hygiene --output-dir DIR --max-steps 12 --save-steps 4 [--resume CHECKPOINT]`` trains
the course's tiny model (full fine-tuning, 64 instruction rows) with ``Trainer``, one CPU thread, and
prints ``saved checkpoint-N`` (flushed) after each checkpoint is complete, so that a parent process knows
when a kill leaves a usable checkpoint behind. ``--step-delay S --slow-after N`` sleeps S seconds after each
step past step N, so that a kill after checkpoint N lands before the next one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from utils import data, models, sft


def instruction_dataset(tokenizer, rows, max_length: int = 64):
    """Tokenized instruction rows (prompt masked) as a ``datasets.Dataset`` for ``Trainer``."""
    from datasets import Dataset

    return Dataset.from_list(sft.tokenize_rows(tokenizer, list(rows), max_length=max_length))


def padding_collator(tokenizer):
    """``Trainer``'s ``data_collator``: right padding with the pad token, labels padded with -100."""
    return lambda features: sft.collate(features, tokenizer.pad_token_id)


def resumable_trainer(output_dir: str | Path, max_steps: int = 12, save_steps: int = 4, callbacks=()):
    """A ``Trainer`` that fine-tunes the tiny base on 64 instruction rows and saves every ``save_steps``.

    Everything that decides the result is fixed (seed, data, one thread, no dropout), so two runs, or one
    run killed and resumed from a checkpoint, end with the same weights on the CPU."""
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as env.setup_notebook: the parent notebook and this script must agree
    model, tokenizer = models.load_model(device="cpu")
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=save_steps,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    rows = list(data.load_instructions("train"))[:64]
    return Trainer(
        model=model,
        args=args,
        train_dataset=instruction_dataset(tokenizer, rows),
        data_collator=padding_collator(tokenizer),
        callbacks=list(callbacks),
    )


def _announcing_callback(step_delay: float, slow_after: int):
    from transformers import TrainerCallback

    class Announce(TrainerCallback):
        """Prints each complete checkpoint (``on_save`` runs after every file is written); from step
        ``slow_after`` on, sleeps ``step_delay`` seconds per step (a long run, for the parent to interrupt)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > slow_after:
                time.sleep(step_delay)

        def on_save(self, args, state, control, **kwargs):
            print(f"saved checkpoint-{state.global_step}", flush=True)

    return Announce()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds of sleep per step")
    parser.add_argument("--slow-after", type=int, default=0, help="sleep only after this many steps")
    parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    args = parser.parse_args(argv)
    from utils import env

    env.quiet_library_noise()
    trainer = resumable_trainer(
        args.output_dir,
        args.max_steps,
        args.save_steps,
        [_announcing_callback(args.step_delay, args.slow_after)],
    )
    trainer.train(resume_from_checkpoint=args.resume)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
