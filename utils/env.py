"""Where the code runs: device and dtype choice, seeds, Colab detection, and known library noise.

This module is the one place that silences messages. Each silenced message is named below with the
reason it is noise for a learner; anything not listed here is left visible on purpose.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import warnings
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Profile:
    """Everything a notebook needs to switch between the offline default and a real model on a GPU.

    ``model_id`` / ``dataset_id``: ``None`` means the course's tiny base and generated data. ``device`` and
    the dtypes are chosen when the profile is selected: weights train in ``dtype`` (fp32), the forward
    pass runs under ``autocast_dtype`` (None on the CPU; bf16 on GPUs of compute capability 8.0 and newer;
    fp16 with loss scaling on older ones such as the T4). ``expectations`` are the floors a chapter
    asserts for this profile (``None``: not measured for it, so not asserted).
    """

    name: str
    model_id: str | None
    dataset_id: str | None
    needs_gpu: bool
    description: str
    expectations: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None

    def load_model(self, **kwargs):
        """``(model, tokenizer)`` of this profile, on its device, weights in ``self.dtype``."""
        from utils import models

        kwargs.setdefault("dtype", self.dtype)
        return models.load_model(self.model_id, device=self.device, **kwargs)

    def load_instructions(self, split: str = "train"):
        """The instruction data of this profile as a ``datasets.Dataset`` with a ``messages`` column."""
        from utils import data

        if self.dataset_id is None:
            return data.load_instructions(split)
        from datasets import load_dataset

        hub_split = "train[:4000]" if split == "train" else "test[:200]"
        return load_dataset(self.dataset_id, split=hub_split)

    def expect(self, key: str, value: float) -> bool:
        """True when ``value`` reaches this profile's floor for ``key`` (a name like ``"01.sft_exact_match"``).

        A key the profile does not know is an error (a typo must not pass silently); a floor of ``None``
        means the figure was never measured on this profile: it prints so and returns True."""
        if key not in self.expectations:
            raise KeyError(
                f"Profile {self.name!r} has no expectation {key!r}; it has {sorted(self.expectations)}."
            )
        floor = self.expectations[key]
        if floor is None:
            print(f"({key} = {value:.3g}: no floor measured for profile {self.name!r}, not asserted)")
            return True
        return value >= floor


# The floors each chapter asserts on the default profile; tests/test_profiles.py checks that every key a
# notebook uses exists in every profile.
CPU_TINY_EXPECTATIONS = {
    "00.fact_completion_withheld": 0.90,
    "01.sft_exact_match": 0.80,
    "01.trainer_exact_match": 0.80,
    "02.full_exact_match": 0.15,  # 40 steps of full fine-tuning learn the format (the base scores 0)
    "02.lora_exact_match": 0.12,  # and so do 40 steps of LoRA
    "03.rank_sweep_learns": 0.10,  # every run learns the format (the base scores 0)
    "04.lora_exact_match_gain": 0.20,
    "04.classifier_accuracy": 0.90,
    "06.probe_gain_over_random": 0.05,  # frozen pretrained Llama vs a random body, head only (balanced)
    "06.sft_exact_match": 0.05,  # 40 SFT steps, last block or LoRA: both start to learn the format (the base scores 0)
    "05.qlora_exact_match": 0.15,  # 40 steps of QLoRA learn the format (the base scores 0)
    "05.lora_exact_match": 0.15,  # and so do 40 steps of LoRA on the fp32 base
    "10.exact_match": 0.15,  # the capstone's 40 QLoRA steps with Trainer learn the format (the base scores 0)
}

PROFILES: dict[str, dict] = {
    "cpu-tiny": {
        "model_id": None,
        "dataset_id": None,
        "needs_gpu": False,
        "description": "the course's tiny Llama-architecture model and generated data, offline, any CPU",
        "expectations": CPU_TINY_EXPECTATIONS,
    },
    "gpu-small": {
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dataset_id": "HuggingFaceTB/smol-smoltalk",  # conversations in a `messages` column, like the course's
        "needs_gpu": True,
        "description": "a real 135M-parameter instruct model from the Hugging Face hub, for a 16 GB T4 or better",
        "expectations": dict.fromkeys(CPU_TINY_EXPECTATIONS),  # not measured on a GPU yet: not asserted
    },
    "gpu-t4": {
        "model_id": "Qwen/Qwen2.5-0.5B-Instruct",
        "dataset_id": "HuggingFaceTB/smol-smoltalk",
        "needs_gpu": True,
        "description": "a real 0.5B instruct model from the Hugging Face hub in 4-bit, for a free 16 GB Colab T4",
        "expectations": dict.fromkeys(CPU_TINY_EXPECTATIONS),  # not measured on a GPU yet: not asserted
    },
}


def in_colab() -> bool:
    """True inside Google Colab (its runtime module is importable only there)."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU.

    ``prefer`` names a device to use if it exists ("cuda", "mps", "cpu"); asking for one that is not
    there prints why and falls back instead of raising.
    """
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if prefer is not None:
        if prefer not in available:
            raise ValueError(f"Unknown device {prefer!r}: choose one of {', '.join(available)}.")
        if available[prefer]:
            return torch.device(prefer)
        print(f"No {prefer.upper()} device on this machine: falling back to {_best(available)}.")
    return torch.device(_best(available))


def _best(available: dict[str, bool]) -> str:
    return next(name for name in ("cuda", "mps", "cpu") if available[name])


def supports_bf16(
    device: torch.device | str | None = None, capability: tuple[int, int] | None = None
) -> bool:
    """True on GPUs of compute capability 8.0 or newer (Ampere: A100, RTX 30xx; then L4, H100 ...).

    Not ``torch.cuda.is_bf16_supported()``: by default that also says True on a T4 (capability 7.5),
    where bf16 is emulated and slow. ``capability`` overrides the query (tests fake a device with it)."""
    if capability is None:
        device = torch.device(device) if device is not None else get_device()
        if device.type != "cuda":
            return False
        capability = torch.cuda.get_device_capability(device)
    return tuple(capability) >= (8, 0)


def get_dtype(
    device: torch.device | str | None = None, capability: tuple[int, int] | None = None
) -> torch.dtype:
    """The 16-bit compute dtype for a GPU, fp32 elsewhere: bf16 from compute capability 8.0 (Ampere),
    fp16 below (a T4 is 7.5: train it with loss scaling), fp32 on the CPU and on MPS."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda" or capability is not None:
        return torch.bfloat16 if supports_bf16(device, capability) else torch.float16
    return torch.float32


def make_profile(
    name: str, device: torch.device | str | None = None, capability: tuple[int, int] | None = None
):
    """The ``Profile`` called ``name`` for ``device`` (no fallback: ``select_profile`` decides that)."""
    if name not in PROFILES:
        raise ValueError(f"Unknown profile {name!r}: choose one of {', '.join(PROFILES)}.")
    device = torch.device(device) if device is not None else get_device()
    on_gpu = device.type == "cuda" or capability is not None
    return Profile(
        name=name,
        **PROFILES[name],
        device=device,
        dtype=torch.float32,  # trained weights in fp32; the 16-bit part is autocast
        autocast_dtype=get_dtype(device, capability) if on_gpu else None,
    )


def select_profile(name: str = "cpu-tiny") -> Profile:
    """The notebook profile called ``name``. A GPU profile on a machine without a GPU explains what it
    would do and falls back to ``cpu-tiny`` (the notebooks then run their default path)."""
    if name not in PROFILES:
        raise ValueError(f"Unknown profile {name!r}: choose one of {', '.join(PROFILES)}.")
    if PROFILES[name]["needs_gpu"] and not torch.cuda.is_available():
        print(
            f"Profile {name!r} needs a CUDA GPU ({PROFILES[name]['description']}) and this machine has none.\n"
            f"Falling back to 'cpu-tiny': {PROFILES['cpu-tiny']['description']}.\n"
            "On Colab choose Runtime > Change runtime type > T4 GPU, then run the notebook again."
        )
        name = "cpu-tiny"
    profile = make_profile(name)
    precision = (
        f", autocast {str(profile.autocast_dtype).removeprefix('torch.')}" if profile.autocast_dtype else ""
    )
    print(f"profile {profile.name}: {profile.model_id or 'tiny base'} on {profile.device.type}{precision}")
    return profile


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) so that a default run repeats exactly."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency, but seeding must never be what fails
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def quiet_library_noise() -> None:
    """Silence the messages that say nothing to a learner. Each entry names the message and why.

    Kept visible on purpose: every warning about the learner's own code or data (a tokenizer
    truncating, a label mismatch, a model not learning).
    """
    # Progress bars of weight loading ("Loading weights: 100%|...") and of datasets' JSON loading,
    # printed for a 3 MB model that loads in milliseconds: noise that buries the cell's result.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # info-level load reports; errors still show
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    # peft and bitsandbytes raise FutureWarnings from inside their own code about their own internals
    # (deprecated torch calls they make); a learner can do nothing about them.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(peft|bitsandbytes)(\..*)?")
    # peft calls transformers' `is_gradient_checkpointing`, which transformers 5 renamed
    # `is_activation_checkpointing`; the FutureWarning is raised on peft's behalf, not the learner's.
    warnings.filterwarnings(
        "ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning
    )
    # bitsandbytes logs that it could not fetch optimized kernels from the "kernels-community" hub repo:
    # expected offline, and the CPU code path it falls back to is correct.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*kernels-community.*")


class _NoBar:
    """What ``progress`` returns when bars are off: the same methods, doing nothing."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_enabled() -> bool:
    """Whether ``progress`` draws bars. ``COURSE_PROGRESS=1`` / ``=0`` decides when set; otherwise bars are on in a
    Jupyter kernel and in a terminal, and off under CI, pytest and nbval (``CI``, ``PYTEST_CURRENT_TEST``), in
    ``make execute`` (which sets ``COURSE_PROGRESS=0``) and when output goes to a file, so committed and tested
    outputs and logs hold results, not bars."""
    setting = os.environ.get("COURSE_PROGRESS", "").strip().lower()
    if setting:
        return setting not in ("0", "false", "no", "off")
    if os.environ.get("CI", "").lower() not in ("", "0", "false") or os.environ.get("PYTEST_CURRENT_TEST"):
        return False
    try:
        from IPython import get_ipython

        if getattr(get_ipython(), "kernel", None) is not None:
            return True
    except ImportError:
        pass
    return sys.stderr.isatty()


def progress(iterable=None, *, total: int | None = None, desc: str | None = None):
    """A progress bar (``tqdm.auto``: a widget in Jupyter, text in a terminal) over ``iterable`` or for ``total``
    manual ``update()`` calls; an object with the same methods that draws nothing when ``progress_enabled()`` is
    False. The one switch for every long loop of the course (training steps, evaluation batches)."""
    if not progress_enabled():
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak memory in GiB: on CUDA the most PyTorch has allocated (``torch.cuda.max_memory_allocated``);
    elsewhere this process's peak resident memory (the operating system's high-water mark, which includes
    Python, the libraries and memory the allocator has not returned). A peak, not the current use."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        return peak_kb * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20
    except ImportError:  # Windows has no resource module
        return float("nan")


def setup_notebook(
    packages: tuple[str, ...] = ("torch", "transformers"), seed: int = 0, threads: int = 1
) -> None:
    """What every notebook's setup cell does: quiet known library noise, seed everything, use ``threads``
    CPU threads, and print the versions of ``packages`` and the device.

    One thread by default: the tiny model gains little from a second one, results repeat bit for bit,
    and two notebooks can run side by side on a 2-core machine. On a GPU the thread count does not matter.
    """
    import importlib.metadata

    quiet_library_noise()
    seed_everything(seed)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny Adam moments become denormal floats, which are slow on CPUs
    versions = " | ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    device = get_device()
    print(f"{versions} | device {device.type} | seed {seed} | {threads} CPU thread{'s' * (threads > 1)}")
