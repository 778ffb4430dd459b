"""The example scripts run end to end with no network: a fixture model sits in a Hugging Face cache under
the default model's repo name, and HF_HUB_OFFLINE=1 / HF_HUB_CACHE are set as a user would set them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caduceus.hub import PUBLISHED_MODELS, place_in_cache
from tests.conftest import FIXTURES

ROOT = Path(__file__).parent.parent
FIXTURE = FIXTURES / "ph_d32_n2"
D_MODEL = json.loads((FIXTURE / "config.json").read_text())["d_model"]


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    place_in_cache(FIXTURE, PUBLISHED_MODELS["caduceus-ph-4L-seqlen-1k-d118"].repo_id, cache_dir=cache)
    return cache


def run_example(name: str, cache: Path) -> str:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name)], env=env, cwd=cache,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_embeddings_example(offline_cache):
    # (2, 118) with the published d118 weights; the fixture standing in for them has d_model 32
    assert run_example("embeddings.py", offline_cache) == f"(2, {D_MODEL})"


def test_fine_tune_example(offline_cache):
    assert run_example("fine_tune.py", offline_cache) == "(5, 3)"
