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

import torch

PROFILES = {
    "cpu-tiny": {
        "model": None,  # None = the course's tiny offline base (utils.models.base_model_path())
        "dataset": None,  # None = the course's generated instruction data (utils.data.load_instructions)
        "needs_gpu": False,
        "description": "the course's tiny Llama-architecture model and generated data, offline, any CPU",
    },
    "gpu-small": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dataset": "HuggingFaceTB/smol-smoltalk",  # conversations in a `messages` column, like the course's
        "needs_gpu": True,
        "description": "a real 135M-parameter instruct model from the Hugging Face hub, for a 16 GB T4 or better",
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


def get_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """Training dtype for a device: bf16 where the GPU supports it (Ampere and newer), fp16 on older GPUs
    such as the T4 (train it with loss scaling), fp32 on the CPU and on MPS."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def select_profile(name: str = "cpu-tiny") -> dict:
    """The settings of a notebook profile. A GPU profile on a machine without a GPU explains what it
    would do and falls back to ``cpu-tiny`` (the notebooks then run their default path)."""
    if name not in PROFILES:
        raise ValueError(f"Unknown profile {name!r}: choose one of {', '.join(PROFILES)}.")
    profile = dict(PROFILES[name], name=name)
    if profile["needs_gpu"] and not torch.cuda.is_available():
        print(
            f"Profile {name!r} needs a CUDA GPU ({profile['description']}) and this machine has none.\n"
            f"Falling back to 'cpu-tiny': {PROFILES['cpu-tiny']['description']}.\n"
            "On Colab choose Runtime > Change runtime type > T4 GPU, then run the notebook again."
        )
        profile = dict(PROFILES["cpu-tiny"], name="cpu-tiny")
    profile["device"] = get_device()
    profile["dtype"] = get_dtype(profile["device"])
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


def memory_used_gb(device: torch.device | str | None = None) -> float:
    """Memory in GiB: peak GPU memory allocated by PyTorch on CUDA, else this process's peak resident
    memory (the operating system's high-water mark, which includes Python and the libraries)."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        return peak_kb * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20
    except ImportError:  # Windows has no resource module
        return float("nan")
