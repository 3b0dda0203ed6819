import logging

import pytest
import torch

from utils import env


def test_cpu_device_and_dtype_here():
    if torch.cuda.is_available():
        pytest.skip("this test describes a machine without CUDA")
    assert env.get_device().type in ("cpu", "mps")
    assert env.get_dtype("cpu") == torch.float32


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        env.get_device("tpu")


def test_missing_gpu_falls_back_with_an_explanation(capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert env.get_device("cuda").type == "cpu"
    assert "No CUDA device" in capsys.readouterr().out


def test_gpu_profile_on_cpu_explains_and_falls_back(capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    profile = env.select_profile("gpu-small")
    assert profile.name == "cpu-tiny" and profile.model_id is None and profile.autocast_dtype is None
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_unknown_profile_names_the_valid_ones():
    with pytest.raises(ValueError, match="cpu-tiny, gpu-small"):
        env.select_profile("gpu-huge")


def test_seed_everything_repeats_random_draws():
    env.seed_everything(7)
    a = torch.randn(5)
    env.seed_everything(7)
    assert torch.equal(a, torch.randn(5))


def test_quiet_library_noise_silences_bitsandbytes_kernel_message():
    env.quiet_library_noise()
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR


@pytest.mark.parametrize(
    "capability, dtype",
    [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
     ((9, 0), torch.bfloat16)],
    ids=["T4", "V100", "A100", "L4", "H100"],
)  # fmt: skip
def test_bf16_is_chosen_by_compute_capability_not_by_emulation(capability, dtype):
    # torch.cuda.is_bf16_supported() says True on a T4 (emulated); the course trains a T4 in fp16
    assert env.get_dtype("cuda", capability=capability) == dtype
    profile = env.make_profile("gpu-small", device="cuda", capability=capability)
    assert profile.autocast_dtype == dtype and profile.dtype == torch.float32


def test_profile_expectations_are_checked_and_unknown_keys_are_errors(capsys):
    tiny = env.make_profile("cpu-tiny", device="cpu")
    assert tiny.expect("01.sft_exact_match", 0.85) and not tiny.expect("01.sft_exact_match", 0.5)
    gpu = env.make_profile("gpu-small", device="cuda", capability=(7, 5))
    assert gpu.expect("01.sft_exact_match", 0.1)  # never measured on a GPU: said, not asserted
    assert "not asserted" in capsys.readouterr().out
    with pytest.raises(KeyError, match="no expectation"):
        tiny.expect("01.sft_exact_mach", 0.9)


def test_every_profile_knows_the_same_expectations():
    keys = {name: set(p["expectations"]) for name, p in env.PROFILES.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1, keys


def test_setup_notebook_prints_versions_and_sets_one_thread(capsys):
    before = torch.get_num_threads()
    try:
        env.setup_notebook(("torch", "peft"), seed=3)
        out = capsys.readouterr().out
        assert f"torch {torch.__version__.split('+')[0]}" in out.replace("+cpu", "") and "peft 0.21.2" in out
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_progress_bars_are_one_switch(monkeypatch):
    import IPython

    class Kernel:
        kernel = object()

    for name in ("COURSE_PROGRESS", "CI", "PYTEST_CURRENT_TEST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(env.sys.stderr, "isatty", lambda: False, raising=False)
    assert not env.progress_enabled()  # a script whose output goes to a file
    monkeypatch.setattr(IPython, "get_ipython", lambda: Kernel())
    assert env.progress_enabled()  # a Jupyter kernel
    monkeypatch.setenv("CI", "true")
    assert not env.progress_enabled()  # CI and nbval: outputs hold results, not bars
    monkeypatch.setenv("COURSE_PROGRESS", "1")
    assert env.progress_enabled()  # the explicit switch wins
    bar = env.progress(range(3), desc="x")
    assert list(bar) == [0, 1, 2]
    bar.close()
    monkeypatch.setenv("COURSE_PROGRESS", "0")
    quiet = env.progress(total=5)
    quiet.update(2), quiet.set_postfix(loss=1.0), quiet.close()  # the same methods, drawing nothing
    assert list(env.progress([1, 2])) == [1, 2]
