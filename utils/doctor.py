"""``python -m utils.doctor``: what is installed, which device the course will use, and what to fix."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys

from utils import env

PACKAGES = [
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "ipywidgets",
    "matplotlib",
    "jupyterlab",
    "nbval",
]


def versions() -> dict[str, str | None]:
    """Installed version of each course package, None where missing."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def bitsandbytes_backend() -> str:
    """Which bitsandbytes path 4-bit layers will take here, in words."""
    env.quiet_library_noise()
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # an import failure is an expected situation on some machines: explain it
        return (
            f"not importable ({type(err).__name__}: {err}); chapter 05 shows its NF4 reference code instead"
        )
    import torch

    if torch.cuda.is_available():
        return "CUDA (the fast path QLoRA was designed for)"
    return "CPU (correct but slow; enough for the tiny model; QLoRA at scale needs a CUDA GPU)"


def widgets_status() -> str:
    """Whether ipywidgets will render: a live Jupyter kernel with the widget manager installed."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "ipywidgets missing: quizzes fall back to text"
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return "installed; they render inside JupyterLab / Colab (here: text fallback, no notebook frontend)"
    return "installed and a notebook kernel is running: widgets render"


def report() -> list[str]:
    """The doctor's lines: versions, device, dtype, bitsandbytes, widgets, then what to fix."""
    lines = [f"python        {sys.version.split()[0]} ({platform.system()} {platform.machine()})"]
    fixes = []
    pins = {}
    try:
        from utils.workbook import pinned_versions

        pins = pinned_versions()
    except Exception:  # outside the repository (an installed wheel), there is no pyproject to compare with
        pins = {}
    for name, version in versions().items():
        want = pins.get(name)
        mark = (
            ""
            if version is None or want is None or version.split("+")[0] == want
            else f"  (course pins {want})"
        )
        lines.append(f"{name:13s} {version or 'MISSING'}{mark}")
        if version is None:
            fixes.append(f"install {name}: run `make lab` or `make test`, which set up .venv")
        elif mark:
            fixes.append(
                f"{name} {version} differs from the pinned {want}: results may differ from the book's"
            )
    device = env.get_device()
    lines.append(
        f"device        {device.type} -> training dtype {str(env.get_dtype(device)).replace('torch.', '')}"
    )
    if device.type == "cpu":
        lines.append("              no GPU: every notebook runs its CPU default (tiny model, minutes)")
    lines.append(f"colab         {'yes' if env.in_colab() else 'no'}")
    lines.append(f"bitsandbytes  {bitsandbytes_backend()}")
    lines.append(f"widgets       {widgets_status()}")
    try:
        from utils.models import base_model_path

        lines.append(f"tiny model    {base_model_path()}")
    except FileNotFoundError as err:
        fixes.append(str(err))
    lines.append("")
    lines += (
        ["what to fix:", *[f"  - {f}" for f in fixes]] if fixes else ["nothing to fix: the course is ready."]
    )
    return lines


def main() -> None:
    env.quiet_library_noise()
    importlib.import_module("torch")
    print("\n".join(report()))


if __name__ == "__main__":
    main()
