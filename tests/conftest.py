"""Shared paths and the tiny fixture model."""
import json
from pathlib import Path

import numpy as np
import pytest

from ldm.util import load_model

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TINY = FIXTURES / "tiny"
TINY_CONFIG = TINY / "config.yaml"
TINY_CKPT = TINY / "model.ckpt"


@pytest.fixture(scope="session")
def tiny_model():
    return load_model(str(TINY_CONFIG), str(TINY_CKPT))


@pytest.fixture(scope="session")
def golden():
    return np.load(TINY / "golden.npz")


@pytest.fixture(scope="session")
def golden_cases():
    return json.loads((TINY / "golden.json").read_text())
