"""Shared fixtures: the tiny base model is loaded once per test session (it takes about a second)."""

import pytest

from utils import env


@pytest.fixture(scope="session")
def tiny():
    from utils import models

    env.seed_everything(0)
    model, tokenizer = models.load_model(device="cpu")
    return model, tokenizer
