"""LoRA from scratch: one layer, and the functions that put it into (and merge it out of) a whole model.

A frozen linear map ``W`` (shape ``(d_out, d_in)``) gets a trainable low-rank update::

    h = W x + scaling * B A x        A: (rank, d_in), B: (d_out, rank), scaling = alpha / rank

(``alpha / sqrt(rank)`` with rsLoRA). The names follow peft's ``LoraLayer`` (``base_layer``, ``lora_A``,
``lora_B``, ``lora_dropout``, ``r``, ``lora_alpha``, ``scaling``, ``merge``, ``unmerge``), so a model
wrapped here has the same parameter names as a peft model with its ``base_model.model.`` prefix and its
adapter name removed: the tensors of a saved peft adapter load into it by name (``load_peft_adapter``).
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."  # what peft puts in front of every parameter name of the wrapped model


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency; without it there is simply no Conv1D to handle
        return None
    return Conv1D


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or of GPT-2's ``Conv1D``.

    ``nn.Linear`` stores its weight as ``(d_out, d_in)`` and computes ``x @ W.T``; ``Conv1D`` stores the
    transpose, ``(d_in, d_out)``, and computes ``x @ W``. Any other module raises ``TypeError``.
    """
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(layer, conv1d):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    raise TypeError(
        f"LoRA here wraps nn.Linear (or GPT-2's Conv1D) layers, not {type(layer).__name__}. Target the "
        "linear projections inside it instead (for example q_proj, v_proj)."
    )


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor in front of ``B A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: ``base_layer(x) + scaling * B(A(dropout(x)))``.

    ``base``: ``nn.Linear`` (weight ``(d_out, d_in)``) or GPT-2's ``Conv1D`` (weight ``(d_in, d_out)``).
    ``lora_A.weight``: ``(rank, d_in)``; ``lora_B.weight``: ``(d_out, rank)``. Input ``x``: ``(..., d_in)``,
    output ``(..., d_out)``.
    """

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ValueError(
                "This layer already has a LoRA adapter: adding a second one would nest LoRA in LoRA."
            )
        d_in, d_out = linear_shape(base)
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}.")
        rank = int(rank)
        if not alpha > 0:
            raise ValueError(
                f"alpha must be positive, got {alpha!r} (scaling = alpha / rank would be {alpha}/{rank})."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        if rank > min(d_in, d_out):
            warnings.warn(
                f"rank {rank} is above min(d_in, d_out) = {min(d_in, d_out)} for this {d_in} -> {d_out} layer: "
                f"B A cannot have rank above {min(d_in, d_out)}, so the extra rank only adds parameters.",
                stacklevel=2,
            )
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        self.lora_A = nn.Linear(d_in, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, d_out, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_features, self.out_features = d_in, d_out
        self.r, self.lora_alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D stores W transposed (peft's name)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # A: Kaiming-uniform with a = sqrt(5), nn.Linear's own default init (as peft and the LoRA paper's
        # code do). A must be random: the gradient of B is scaling * grad_h (A x)^T, which is zero if A is.
        # B: zeros, so B A = 0 and the wrapped model starts exactly equal to the base model. With B = 0 the
        # gradient of A (scaling * B^T grad_h x^T) is zero at the first step, but B moves, and A follows.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout: ``(d_out, d_in)``, transposed for ``Conv1D``."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # B A is already inside W: the base layer alone computes W x + scaling B A x
            return result
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * B A`` into the base weight, so that a forward pass costs what the base costs."""
        if self.merged:
            warnings.warn(
                "This LoRA layer is already merged; merging twice would add B A twice.", stacklevel=2
            )
            return
        weight = self.base_layer.weight
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``scaling * B A`` from the base weight again (exact up to floating-point rounding)."""
        if not self.merged:
            warnings.warn("This LoRA layer is not merged; there is nothing to unmerge.", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"rank={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )


def target_matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """peft's matching rule for ``target_modules``: a string is a regular expression the whole module name
    must match; a list matches a module whose name equals an entry or ends with ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the linear layers of ``model`` (``["q_proj", "k_proj", ...]``), in order:
    the names ``target_modules`` can use. Layers inside LoRA adapters are left out."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or ".lora_" in f".{name}" or not _is_linear(module):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names and leaf != "base_layer":
            names.append(leaf)
    return names


def add_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """Wrap every linear layer whose name matches ``target_modules`` in a ``LoRALinear`` and freeze
    every other parameter. Modifies ``model`` in place and returns it.

    Raises ``ValueError`` when nothing matches (listing the linear layer names that exist) or when a
    matched layer already has LoRA, and ``TypeError`` when a matched module is not a linear layer.
    """
    if isinstance(target_modules, str) and not target_modules:
        raise ValueError(
            "target_modules is empty: name the linear layers to adapt, e.g. ['q_proj', 'v_proj']."
        )
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError(
                "target_modules is empty: name the linear layers to adapt, e.g. ['q_proj', 'v_proj']."
            )
    matched = [
        (name, module)
        for name, module in model.named_modules()
        if name and target_matches(name, target_modules)
    ]
    if not matched:
        raise ValueError(
            f"target_modules={target_modules!r} matches no module of this {type(model).__name__}. "
            f"Its linear layers are named: {', '.join(linear_module_names(model))}."
        )
    for name, module in matched:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter: add_lora was called twice on this layer.")
        if not _is_linear(module):
            linears = linear_module_names(model)
            where = (
                f"Linear layers in this model: {', '.join(linears)}." if linears else "This model has none."
            )
            raise TypeError(
                f"{name} is a {type(module).__name__}, not a linear layer: LoRA here adapts nn.Linear / Conv1D. {where}"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout=dropout, use_rslora=use_rslora))
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every ``(name, LoRALinear)`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter of ``model`` into its base weight, in place; returns ``model``."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("This model has no LoRALinear layers to merge (add them with add_lora first).")
    for _, layer in layers:
        if not layer.merged:
            layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``: subtract every merged adapter from its base weight, in place; returns ``model``."""
    for _, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by its base layer (merge first to keep the update): the model is then
    the base architecture again, with the same modules and the same cost per token as before LoRA."""
    for name, _ in list(lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).base_layer)
    return model


def peft_to_lora_state_dict(peft_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a saved peft adapter (``get_peft_model_state_dict`` / ``adapter_model.safetensors``) to this
    module's names: drop the ``base_model.model.`` prefix. peft already drops the adapter name on saving."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in peft_state_dict.items()}


def load_peft_adapter(model: nn.Module, peft_state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a peft adapter's tensors into a model wrapped by ``add_lora``. Every LoRA tensor of the model
    must be in the adapter and the reverse (a clear ``KeyError`` lists what is missing); returns ``model``."""
    state = peft_to_lora_state_dict(peft_state_dict)
    own = {k for k in model.state_dict() if ".lora_A." in k or ".lora_B." in k}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise KeyError(
            f"The adapter does not fit this model: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}. Same target_modules and rank?"
        )
    model.load_state_dict(state, strict=False)
    return model


@torch.no_grad()
def init_lora_(model: nn.Module, scheme: str = "peft", seed: int = 0) -> nn.Module:
    """Re-initialize every adapter of ``model`` for the initialization experiment; returns ``model``.

    ``"peft"``: A Kaiming-uniform, B zeros (the standard); ``"zeros"``: both zero; ``"random"``: both
    Kaiming-uniform (B then makes the model differ from the base before any training).
    """
    if scheme not in ("peft", "zeros", "random"):
        raise ValueError(f"Unknown scheme {scheme!r}: choose 'peft', 'zeros' or 'random'.")
    torch.manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.reset_lora_parameters()
        if scheme == "zeros":
            nn.init.zeros_(layer.lora_A.weight)
        elif scheme == "random":
            nn.init.kaiming_uniform_(layer.lora_B.weight, a=math.sqrt(5))
    return model


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The closest matrix of rank at most ``k`` to ``matrix`` (Frobenius and spectral norm, Eckart-Young):
    ``U[:, :k] @ diag(S[:k]) @ Vh[:k, :]``. ``matrix``: (m, n); returns (m, n)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k, :]
