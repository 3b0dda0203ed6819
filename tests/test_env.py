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
    assert profile["name"] == "cpu-tiny" and profile["model"] is None
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
