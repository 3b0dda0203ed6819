"""Every chapter's configuration cell, run under every profile's definition (no GPU and no hub needed).

A profile must never silently break a notebook: the cell is executed with the profile built as it would be on
its target device (a T4 for the GPU profile), with model and data loading replaced by the course's tiny model
and data, recording what would have been loaded. Then: the right model id and dataset, the right dtypes for
the device, and every floor the notebook asserts (``profile.expect("...")``) defined for every profile.
"""

import re

import nbformat
import pytest
import torch

from utils import course, data, env, models

WRITTEN = [ch for ch in course.CHAPTERS if ch.written]


def _config_cell(ch) -> str | None:
    nb = nbformat.read(ch.solution, as_version=4)
    cells = [
        c.source for c in nb.cells if c.cell_type == "code" and re.search(r"^PROFILE = ", c.source, re.M)
    ]
    assert len(cells) <= 1, f"{ch.solution.name}: one configuration cell, found {len(cells)}"
    return cells[0] if cells else None


def _cells_before_config(ch) -> list[str]:
    """The code cells between the generated header and the configuration cell (imports, a version print)."""
    nb = nbformat.read(ch.solution, as_version=4)
    out = []
    for c in nb.cells:
        if c.cell_type != "code" or "course-header" in c.metadata.get("tags", []):
            continue
        if re.search(r"^PROFILE = ", c.source, re.M):
            return out
        out.append(c.source)
    return out


def _notebook_code(ch) -> str:
    nb = nbformat.read(ch.solution, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("ch", [ch for ch in WRITTEN if ch.number != 9], ids=lambda c: c.id)
def test_every_training_chapter_has_one_configuration_cell(ch):
    source = _config_cell(ch)
    assert source is not None and 'PROFILE = "cpu-tiny"' in source, (
        f"{ch.solution.name}: PROFILE defaults to cpu-tiny"
    )
    assert "env.select_profile(PROFILE)" in source


@pytest.mark.parametrize("profile_name", list(env.PROFILES))
@pytest.mark.parametrize("ch", [ch for ch in WRITTEN if ch.number != 9], ids=lambda c: c.id)
def test_configuration_cell_wires_each_profile(ch, profile_name, monkeypatch, tiny):
    model, tokenizer = tiny
    spec = env.PROFILES[profile_name]
    device, capability = ("cuda", (7, 5)) if spec["needs_gpu"] else ("cpu", None)  # a free Colab T4
    loaded = {}

    def fake_select(name):
        assert name == profile_name
        return env.make_profile(name, device=device, capability=capability)

    def fake_load_model(self, **kwargs):
        loaded["model"] = (self.model_id, kwargs.get("dtype", self.dtype))
        return models.load_model(device="cpu", dtype=torch.float32)

    def fake_load_instructions(self, split="train"):
        loaded.setdefault("data", []).append((self.dataset_id, split))
        return data.load_instructions(split).select(range(8))

    monkeypatch.setattr(env, "select_profile", fake_select)
    monkeypatch.setattr(env.Profile, "load_model", fake_load_model)
    monkeypatch.setattr(env.Profile, "load_instructions", fake_load_instructions)
    source = _config_cell(ch).replace('PROFILE = "cpu-tiny"', f"PROFILE = {profile_name!r}", 1)
    namespace = {"env": env}  # what the generated setup cell defines
    for before in _cells_before_config(ch):
        exec(compile(before, f"{ch.solution.name}:before-config", "exec"), namespace)
    exec(compile(source, f"{ch.solution.name}:config", "exec"), namespace)
    profile = namespace["profile"]
    assert profile.name == profile_name and profile.model_id == spec["model_id"]
    if "model" in loaded:
        assert loaded["model"] == (spec["model_id"], torch.float32)  # fp32 weights; 16-bit is autocast
    for dataset_id, _ in loaded.get("data", []):
        assert dataset_id == spec["dataset_id"]
    if spec["needs_gpu"]:
        assert profile.autocast_dtype == torch.float16  # a T4: fp16 (with loss scaling), not emulated bf16
    else:
        assert profile.autocast_dtype is None and profile.device.type == "cpu"


@pytest.mark.parametrize("ch", WRITTEN, ids=lambda c: c.id)
def test_every_floor_a_notebook_asserts_exists_in_every_profile(ch):
    keys = set(re.findall(r"profile\.expect\(\"([^\"]+)\"", _notebook_code(ch)))
    for key in keys:
        assert key.startswith(f"{ch.id}."), f"{ch.solution.name} asserts {key!r}, another chapter's floor"
        for name, spec in env.PROFILES.items():
            assert key in spec["expectations"], f"profile {name} has no floor {key!r}"


def test_no_notebook_asserts_a_cpu_tiny_threshold_by_hand():
    """Absolute accuracy floors belong to the profile, so that the GPU profile cannot fail on them."""
    for ch in WRITTEN:
        code = _notebook_code(ch)
        bad = re.findall(r"assert (?:em|acc)\w* >= 0\.\d+", code)
        assert not bad, f"{ch.solution.name}: {bad} -> profile.expect(...)"
