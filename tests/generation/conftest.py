"""Generation fixtures: the tiny Llama model built here (SmolLM2's tokenizer); tests teach it texts with
`tests.taught`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from services.common.models import tiny_lm_folder

    return tiny_lm_folder(ROOT / ".cache/models")
