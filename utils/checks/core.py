"""What every checker shares: ``run_check`` (call, judge, report) and the helpers the checkers use to
hand the learner's function fresh inputs and to validate what it returns.

``run_check(name, fn, body)`` runs ``body`` with a guarded ``fn``. The guard tells apart the three ways a
check can end besides passing:

* the learner's function raised: if it is the stub's own ``raise NotImplementedError``, the exercise is
  not attempted (or, when a body was written above or below that line, the learner is told to delete it);
  any other exception is reported with the learner's own line (the last frame outside this package and
  the libraries), so the learner sees where their code broke, not where a library noticed;
* the body raised ``CheckFailed``: the answer is wrong, and the message says how;
* the body itself raised anything else: the check could not use what the function returned (its type,
  shape or dtype). That is never blamed on the learner's code; each checker validates return values
  first, so this is a last resort.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import inspect
import json
import numbers
import os
import sys
import sysconfig
import textwrap
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOT_ATTEMPTED, HAS_BODY = "stub", "body"
_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "numpy")


class CheckFailed(Exception):
    """Raised inside a checker body to report what is wrong (the message is shown to the learner)."""


class _LearnerRaised(Exception):
    """The learner's function raised ``error`` (carried with its traceback)."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


def _guard(fn: Callable) -> Callable:
    """``fn`` whose exceptions come out wrapped, so the checker can tell them from its own."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise _LearnerRaised(err) from None

    return call


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[Path, ...]:
    """Folders whose frames are never the learner's: this package, the libraries, the standard library."""
    dirs = [Path(__file__).resolve().parents[1]]  # the utils package
    for name in _LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            dirs.append(Path(spec.origin).resolve().parent)
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            dirs.append(Path(paths[key]).resolve())
    return tuple(dict.fromkeys(dirs))


def is_library_frame(filename: str) -> bool:
    """True for a frame inside ``utils``, torch, transformers, peft, site-packages or the standard library.

    A notebook cell's frame (``/tmp/ipykernel_.../123.py``, ``<ipython-input-...>``) is the learner's."""
    if filename.startswith("<frozen") or "site-packages" in filename or "dist-packages" in filename:
        return True
    if filename.startswith("<"):
        return False
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    return any(path.is_relative_to(d) for d in _library_dirs())


def learner_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The last frame of ``error``'s traceback that is the learner's code, or None."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [f for f in frames if not is_library_frame(f.filename)]
    return mine[-1] if mine else None


def _where(frame: traceback.FrameSummary) -> str:
    """``at line N of NAME: CODE`` for the learner's frame (a notebook cell's lines count from its top)."""
    name = "your cell" if frame.name == "<module>" else frame.name
    text = f"at line {frame.lineno} of {name}"
    return text + (f": {frame.line.strip()}" if frame.line and frame.line.strip() else "")


def _is_not_implemented_raise(node: ast.stmt) -> bool:
    if not isinstance(node, ast.Raise) or node.exc is None:
        return False
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def _is_filler(node: ast.stmt) -> bool:
    """A docstring, ``pass`` or ``...``: what a stub may hold besides its raise."""
    if isinstance(node, ast.Pass):
        return True
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and (isinstance(node.value.value, str) or node.value.value is Ellipsis)
    )


def stub_state(fn: Callable) -> str | None:
    """``"stub"`` if ``fn``'s body is only the stub's ``raise NotImplementedError``, ``"body"`` if it holds
    other statements as well (written above or below that line), None when the source cannot be read
    (a lambda, a builtin, code typed at a bare prompt) or has no such raise."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    func = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)), None)
    if func is None:
        return None
    raises = [s for s in func.body if _is_not_implemented_raise(s)]
    if not raises:
        return None
    others = [s for s in func.body if not _is_filler(s) and not _is_not_implemented_raise(s)]
    return HAS_BODY if others else NOT_ATTEMPTED


@dataclass(frozen=True)
class CheckResult:
    """One run of ``run_check``: which ``check_*`` function ran it (``checker``) and in which of its calls
    (``invocation``: a checker such as ``check_blockwise_absmax`` runs two parts in one call), the exercise's name,
    True (right), False (wrong, with the reason in ``message``) or None (not attempted), and the line shown."""

    checker: str
    invocation: int
    name: str
    result: bool | None
    message: str


# Every check that ran in this process, in order: ``python -m utils.grade`` reads them from a learner's kernel,
# and the notebook tests confirm that a student copy's check reports "not attempted" (``utils.workbook``).
RESULTS: list[CheckResult] = []
GRADE_RESULTS_ENV = "COURSE_GRADE_RESULTS"
_calls = {"frame": None, "count": 0}  # the last checker call's frame, held so that its identity stays unique


def run_check(name: str, fn: Callable, body: Callable[[Callable], Any]) -> bool | None:
    """Run ``body(fn)``, which raises ``CheckFailed`` with a hint when ``fn`` is wrong.

    Returns True (passed), False (wrong, or the function crashed) or None (not attempted yet: the stub's
    ``raise NotImplementedError`` is still what runs). Never raises on the learner's behalf.
    """
    result, message = _run_check(name, fn, body)
    print(message)
    caller = sys._getframe(1)  # the check_* function that called us
    if caller is not _calls["frame"]:
        _calls["frame"], _calls["count"] = caller, _calls["count"] + 1
    record = CheckResult(caller.f_code.co_name, _calls["count"], name, result, message)
    RESULTS.append(record)
    if os.environ.get(
        GRADE_RESULTS_ENV
    ):  # set by utils.grade: a JSON line per check, kept if the kernel dies
        with open(os.environ[GRADE_RESULTS_ENV], "a", encoding="utf-8") as f:
            f.write(json.dumps(record.__dict__) + "\n")
    return result


def verdict(results: list[CheckResult] | list[dict]) -> tuple[str, str]:
    """("right" | "wrong" | "not attempted" | "not run", reason) of one exercise from its checker's results: the
    parts of its latest call count; right only when every part passed."""
    rows = [r if isinstance(r, dict) else r.__dict__ for r in results]
    if not rows:
        return "not run", "its check did not run"
    last = [r for r in rows if r["invocation"] == rows[-1]["invocation"]]
    wrong = [r for r in last if r["result"] is False]
    if wrong:
        return "wrong", wrong[0]["message"]
    if all(r["result"] is True for r in last):
        return "right", ""
    return "not attempted", ""


def last_check_passed() -> bool:
    """Whether the latest checker call passed in every part (nbgrader's hidden test, ``utils.classroom``)."""
    if not RESULTS:
        raise AssertionError("no check has run")
    status, reason = verdict([r for r in RESULTS if r.checker == RESULTS[-1].checker])
    if status != "right":
        raise AssertionError(reason or f"the exercise is {status}")
    return True


def _run_check(name: str, fn: Callable, body: Callable[[Callable], Any]) -> tuple[bool | None, str]:
    try:
        body(_guard(fn))
    except _LearnerRaised as wrapped:
        err = wrapped.error
        frames = traceback.extract_tb(err.__traceback__)
        raised_by_learner = bool(frames) and not is_library_frame(frames[-1].filename)
        if isinstance(err, NotImplementedError) and raised_by_learner:
            if stub_state(fn) == HAS_BODY:
                return None, (
                    f"[{name}] your function still holds the stub's `raise NotImplementedError(...)` line, "
                    "so the code you wrote never runs: delete that line, run the cell, then run this cell again."
                )
            return None, (
                f"[{name}] not attempted yet: fill in the function above, run its cell, then run this cell again."
            )
        frame = learner_frame(err)
        where = f"\n    {_where(frame)}" if frame else ""
        return False, f"[{name}] your function raised {type(err).__name__}: {err}{where}"
    except CheckFailed as err:
        return False, f"[{name}] not yet right: {err}"
    except Exception as err:  # the checker could not use the result: never blame the learner's code
        return False, (
            f"[{name}] not yet right: the check could not use what your function returned "
            f"({type(err).__name__}: {err}). Look at the type and shape of what you return."
        )
    return True, f"[{name}] correct."


# Fresh inputs, and whether the learner's function changed them.


def fresh_copy(value: Any) -> Any:
    """A deep copy: tensors cloned (detached), lists, tuples and dicts copied all the way down."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [fresh_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(fresh_copy(v) for v in value)
    if isinstance(value, Mapping):
        copied = {k: fresh_copy(v) for k, v in value.items()}
        return copied if type(value) is dict else _same_mapping_type(value, copied)
    return copy.deepcopy(value)


def _same_mapping_type(original: Mapping, copied: dict) -> Mapping:
    try:
        return type(original)(copied)
    except Exception:
        return copied


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested tensors, lists, tuples, dicts and configs (shape and dtype included)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if hasattr(a, "named_parameters") and hasattr(b, "named_parameters"):  # a model: weights and flags
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        return pa.keys() == pb.keys() and all(
            pa[k].requires_grad == pb[k].requires_grad and same(pa[k].detach(), pb[k].detach()) for k in pa
        )
    if hasattr(a, "to_dict") and hasattr(b, "to_dict"):
        return a.to_dict() == b.to_dict()
    try:
        return bool(a == b)
    except Exception:
        return False


def call_on_copies(fn: Callable, **inputs: Any) -> tuple[Any, list[str]]:
    """Call ``fn`` on fresh copies of ``inputs`` (in order) and return ``(result, names it changed)``.

    The originals are never handed out, so a function that changes its inputs in place cannot corrupt
    the caller's data or the reference, and the change is reported by name."""
    copies = {k: fresh_copy(v) for k, v in inputs.items()}
    got = fn(*copies.values())
    changed = [k for k in inputs if not same(inputs[k], copies[k])]
    return got, changed


def mutation_message(changed: list[str], advice: str = "") -> str:
    names = " and ".join(f"`{n}`" for n in changed)
    return (
        f"your function changes its input {names} in place. The caller still needs it as it was "
        f"(in a notebook, later cells would see the changed data){': ' + advice if advice else ''}."
    )


# Describing and validating what the learner returned.


def describe(value: Any) -> str:
    """A short, exact description of a value for a message: its type, and shape and dtype for a tensor."""
    import torch

    if value is None:
        return "None"
    if isinstance(value, type):
        return f"the class {value.__name__} itself, not an instance of it"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, bool):
        return f"a bool ({value})"
    if isinstance(value, list | tuple | dict | set):
        n = len(value)
        return f"a {type(value).__name__} of {n} item{'s' if n != 1 else ''}"
    if isinstance(value, numbers.Number):
        return f"a {type(value).__name__} ({value!r})"
    if isinstance(value, str):
        return f"a str ({value[:40]!r})"
    return f"a {type(value).__module__}.{type(value).__qualname__}".replace("builtins.", "")


def expect_int(got: Any, what: str = "a count") -> int:
    """``got`` as an int, or ``CheckFailed`` saying what came back instead (a bool is not a count)."""
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        raise CheckFailed(f"return an int ({what}); your function returned {describe(got)}.")
    return int(got)


def expect_tensor(got: Any, shape: tuple[int, ...] | None = None, what: str = "a tensor"):
    """``got`` as a floating-point tensor of ``shape`` (when given), or ``CheckFailed`` describing it."""
    import torch

    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"return {what}; your function returned {describe(got)}.")
    if not (got.is_floating_point() or got.is_complex()):
        raise CheckFailed(f"return a floating-point tensor; yours has dtype {got.dtype}.")
    if got.is_complex():
        raise CheckFailed("return a real tensor; yours is complex.")
    if got.device.type == "meta":
        raise CheckFailed("your tensor is on the meta device: it has a shape but no values.")
    if shape is not None and tuple(got.shape) != tuple(shape):
        raise CheckFailed(f"the result should have shape {tuple(shape)}; yours is {tuple(got.shape)}.")
    return got


def close(got, want, atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    """``torch.allclose`` in float64, whatever the two dtypes (a learner may return another float dtype)."""
    import torch

    got, want = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    return got.shape == want.shape and bool(torch.allclose(got, want, atol=atol, rtol=rtol))


def edited_config(config, **changes):
    """A copy of ``config`` with some fields changed (to compute what a common mistake would count)."""
    other = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(other, key, value)
    return other
