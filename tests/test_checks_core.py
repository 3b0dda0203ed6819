"""run_check itself: not attempted vs a body left above the stub's raise, the learner's own line in a crash
report, a result the check cannot use never blamed on the learner, fresh inputs and mutation detection."""

import torch

from utils import checks
from utils.checks import core


def _stub(x):
    """Docstring."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def _body_then_raise(x):
    """Docstring."""
    y = x + 1
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return y


def _raise_then_body(x):
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return x + 1


def _call_it(fn):
    fn(1)


def test_untouched_stub_is_not_attempted(capsys):
    assert core.stub_state(_stub) == core.NOT_ATTEMPTED
    assert checks.run_check("demo", _stub, _call_it) is None
    out = capsys.readouterr().out
    assert "[demo] not attempted yet" in out and "delete" not in out


def test_a_body_with_the_stub_raise_left_in_is_told_to_delete_it(capsys):
    for fn in (_body_then_raise, _raise_then_body):
        assert core.stub_state(fn) == core.HAS_BODY
        assert checks.run_check("demo", fn, _call_it) is None
        out = capsys.readouterr().out
        assert "delete that line" in out and "not attempted" not in out


def test_a_lambda_or_builtin_falls_back_to_not_attempted(capsys):
    def raiser(*args):
        raise NotImplementedError

    lam = lambda x: raiser(x)  # noqa: E731 - the source of a lambda cannot be parsed as a function
    assert core.stub_state(lam) is None and core.stub_state(len) is None
    assert checks.run_check("demo", lam, _call_it) is None
    assert "not attempted yet" in capsys.readouterr().out


def test_a_crash_names_the_learners_line_not_a_library_frame(capsys):
    def learner(x):
        a = torch.zeros(2, 3)
        return torch.nn.functional.cross_entropy(a, torch.zeros(4, dtype=torch.long))

    assert checks.run_check("demo", learner, _call_it) is False
    out = capsys.readouterr().out
    assert "your function raised ValueError" in out
    assert "of learner: return torch.nn.functional.cross_entropy(a, torch.zeros(4, dtype=torch.long))" in out
    assert "functional.py" not in out


def test_not_implemented_inside_a_library_is_a_crash_not_a_stub(capsys):
    def learner(x):
        return torch.nn.Module()(torch.zeros(1))  # Module.forward is not implemented

    assert checks.run_check("demo", learner, _call_it) is False
    out = capsys.readouterr().out
    assert "your function raised NotImplementedError" in out and "of learner" in out


def test_the_checkers_own_failure_is_never_blamed_on_the_learner(capsys):
    def body(fn):
        list(fn(1))  # the learner returned None: list(None) fails here, in the checker

    assert checks.run_check("demo", lambda x: None, body) is False
    out = capsys.readouterr().out
    assert "could not use what your function returned" in out and "your function raised" not in out


def test_check_failed_and_success(capsys):
    def body(fn):
        if fn(1) != 2:
            raise checks.CheckFailed("off by one")

    assert checks.run_check("demo", lambda x: x, body) is False
    assert "[demo] not yet right: off by one" in capsys.readouterr().out
    assert checks.run_check("demo", lambda x: x + 1, body) is True
    assert "[demo] correct." in capsys.readouterr().out


def test_library_frames():
    assert core.is_library_frame(torch.__file__)
    assert core.is_library_frame(core.__file__)
    assert not core.is_library_frame("/tmp/ipykernel_1234/567.py")
    assert not core.is_library_frame("<ipython-input-3-abc>")
    assert not core.is_library_frame(__file__)


def test_fresh_copies_and_mutation_are_detected():
    t = torch.arange(4)
    data = {"a": [1, [2, 3]], "t": t, "tup": (t, 5)}
    copy = core.fresh_copy(data)
    assert core.same(data, copy)
    copy["a"][1].append(4)
    copy["t"][0] = 9
    assert not core.same(data, copy) and data["a"][1] == [2, 3] and t[0] == 0

    def mutate(xs, n):
        xs.append(n)
        return len(xs)

    got, changed = core.call_on_copies(mutate, xs=[1, 2], n=3)
    assert got == 3 and changed == ["xs"]
    assert not core.same(torch.zeros(2), torch.zeros(2, dtype=torch.float64))


def test_describe_and_validators():
    assert core.describe(None) == "None"
    assert core.describe(torch.zeros(2, 3)) == "a tensor of shape (2, 3) and dtype torch.float32"
    assert core.describe([1, 2]) == "a list of 2 items"
    assert core.describe(1.5) == "a float (1.5)"
    for bad, text in [(1.5, "a float"), (True, "a bool"), (None, "None")]:
        try:
            core.expect_int(bad)
        except checks.CheckFailed as err:
            assert text in str(err)
        else:
            raise AssertionError(f"{bad!r} accepted as a count")
    assert core.expect_int(torch.tensor(3).item()) == 3
    try:
        core.expect_tensor(torch.arange(3))
    except checks.CheckFailed as err:
        assert "floating-point" in str(err)
    else:
        raise AssertionError("an integer tensor accepted")
