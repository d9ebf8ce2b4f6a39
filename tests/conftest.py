"""Fixtures shared by the test modules: the pretraining ones' mixture and environment, one torch thread."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder shared by the pretraining test modules of this session (the tokenizer cache, the test mixture)."""
    folder = tmp_path_factory.getbasetemp() / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def test_mixture(tmp_path_factory) -> str:
    """A two-source mixture (stdlib prose and code, 150 documents each) as local JSON lines: the real data pipeline,
    without re-parsing the whole embedded corpus in every launch."""
    from genesis_hf import corpus

    folder = shared_dir(tmp_path_factory, "pretrain-mixture")
    mixture = folder / "mixture.yaml"
    if not mixture.is_file():
        sources = []
        for name, weight in zip(corpus.EMBEDDED_SOURCES, (0.6, 0.4)):
            with open(folder / f"{name}.jsonl", "w") as handle:
                for document in corpus.iter_documents(name, max_documents=150):
                    handle.write(json.dumps({"text": document}) + "\n")
            sources.append({"name": name, "location": str(folder / f"{name}.jsonl"), "weight": weight})
        mixture.write_text(yaml.safe_dump({"name": "pretrain-test", "holdout_every": 10, "sources": sources}))
    return str(mixture)


@pytest.fixture(scope="module")
def run_env(tmp_path_factory) -> dict[str, str]:
    """Environment for recipe subprocesses: a private tokenizer cache and HF home, CPU only, offline."""
    home = shared_dir(tmp_path_factory, "pretrain-home")
    env = dict(os.environ)
    env.update(
        GENESIS_HF_CACHE=str(home / "genesis_hf"),
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
    )
    env.pop("GENESIS_HF_FAULT", None)
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    their matmuls are too small to share, and on a busy 2-core machine OpenMP threads waiting for each other made tiny
    forward and generate() calls tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
