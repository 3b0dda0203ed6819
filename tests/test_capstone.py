"""The capstone script end to end on the tiny profile (a short run), and its answers to bad input."""

import json
import subprocess
import sys

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from utils import capstone, env, models


def test_script_runs_end_to_end_on_the_tiny_profile(tmp_path, capsys):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    assert (
        capstone.main(
            ["--profile", "cpu-tiny", "--output-dir", str(out), "--max-steps", "10", "--n-test", "32"]
        )
        == 0
    )
    report = json.loads((out / capstone.REPORT_FILE).read_text())
    assert report["profile"] == "cpu-tiny" and report["quantized_4bit"] and report["steps_trained"] == 10
    assert (out / "adapter" / capstone.ADAPTER_WEIGHTS).exists() and (
        out / "merged" / "model.safetensors"
    ).exists()
    assert not (out / "checkpoints").exists()  # the trainer's checkpoints are removed
    adapter = report["adapter_bytes"][capstone.ADAPTER_WEIGHTS]
    assert adapter < report["merged_bytes"]["model.safetensors"] / 10
    assert report["after"]["answer_perplexity"] < report["before"]["answer_perplexity"]
    assert report["reloaded_max_logit_diff"] == 0.0 and report["reloaded_same_answers"]
    assert report["merged_max_logit_diff"] < 1e-4 and report["merged_same_answers"]
    assert report["memory_estimate_bytes"]["total"] > 0
    assert "wrote" in capsys.readouterr().out


def test_refuses_an_output_dir_that_is_not_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("a learner's earlier work")
    with pytest.raises(FileExistsError, match="not empty"):
        capstone.prepare_output_dir(tmp_path)
    with pytest.raises(SystemExit):
        capstone.main(["--output-dir", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "a learner's earlier work"


def test_an_empty_existing_dir_is_accepted(tmp_path):
    assert capstone.prepare_output_dir(tmp_path) == tmp_path


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(ValueError, match="cpu-tiny.*gpu-t4"):
        capstone.settings("gpu-huge")
    with pytest.raises(ValueError, match="cpu-tiny"):
        capstone.resolve_profile("gpu-huge")
    result = subprocess.run(
        [sys.executable, "-m", "utils.capstone", "--profile", "gpu-huge", "--output-dir", "/nonexistent/x"],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 2
        and "unknown profile 'gpu-huge'" in result.stderr
        and "cpu-tiny" in result.stderr
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_gpu_profile_on_a_cpu_explains_and_runs_the_default(capsys):
    profile = capstone.resolve_profile("gpu-t4")
    assert profile.name == "cpu-tiny" and profile.device.type == "cpu"
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert capstone.settings(profile).profile == "cpu-tiny"


def test_every_capstone_profile_is_a_course_profile():
    assert set(capstone.SETTINGS) <= set(env.PROFILES)
    for name in capstone.SETTINGS:
        cfg = capstone.settings(name)
        assert cfg.target_modules == "all-linear" and cfg.quant_type == "nf4" and cfg.double_quant
        assert all(f in capstone.describe(cfg) for f in ("rank", "learning_rate", "# "))


@pytest.fixture
def adapter_dir(tmp_path):
    base, _ = models.load_model(device="cpu", dtype=torch.float32)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear"))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def test_adapter_on_the_wrong_base_names_the_mismatch(adapter_dir):
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4)
    )  # fmt: skip
    with pytest.raises(
        capstone.AdapterMismatchError,
        match=r"gate_proj: the adapter.s lora_A expects 192 inputs, the base layer has 64",
    ):
        capstone.load_adapter(other, adapter_dir)
    shallow = LlamaForCausalLM(
        LlamaConfig(vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
    )  # fmt: skip
    with pytest.raises(capstone.AdapterMismatchError, match="layers.2.*no such layer"):
        capstone.load_adapter(shallow, adapter_dir)


def test_adapter_on_the_right_base_loads_and_a_missing_adapter_is_explained(adapter_dir, tmp_path):
    base, _ = models.load_model(device="cpu", dtype=torch.float32)
    assert capstone.adapter_mismatches(base, adapter_dir) == []
    assert isinstance(capstone.load_adapter(base, adapter_dir), peft.PeftModel)
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        capstone.load_adapter(base, tmp_path / "nothing")
