"""Bad input gives clear errors: None, non-str items, empty strings, non-model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeplaid.model import ColBERT, NotAModelError


@pytest.fixture(scope="module")
def bert(model_dirs: dict[str, Path]) -> ColBERT:
    return ColBERT.from_pretrained(model_dirs["bert"])


@pytest.mark.parametrize("encode", ["encode_queries", "encode_documents"])
def test_bad_texts(bert: ColBERT, encode: str) -> None:
    fn = getattr(bert, encode)
    with pytest.raises(TypeError, match="must be a list of strings"):
        fn(None)
    with pytest.raises(TypeError, match="must be a list of strings"):
        fn(42)
    with pytest.raises(TypeError, match=r"\[1\] must be a str, got NoneType"):
        fn(["ok", None])
    with pytest.raises(TypeError, match=r"\[0\] must be a str, got int"):
        fn([3, "ok"])
    with pytest.raises(ValueError, match=r"\[1\] is empty"):
        fn(["ok", ""])
    with pytest.raises(ValueError, match=r"\[0\] is empty"):
        fn(["  \n\t"])
    with pytest.raises(ValueError, match="batch_size"):
        fn(["ok"], batch_size=0)


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(NotAModelError, match=r"neither modules\.json"):
        ColBERT.from_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotAModelError, match="is a file"):
        ColBERT.from_pretrained(tmp_path / "notes.txt")
    with pytest.raises(NotAModelError, match="not a directory"):
        ColBERT.from_pretrained(tmp_path / "missing" / "deeper")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "modules.json").write_text(json.dumps([{"idx": 0, "path": "", "type": "x.models.Pooling"}]))
    with pytest.raises(NotAModelError, match="no Transformer module"):
        ColBERT.from_pretrained(bad)


def test_hub_id_offline_is_a_clear_error() -> None:
    # HF_HUB_OFFLINE=1 (conftest): an uncached Hub id fails with one readable error, no download.
    with pytest.raises(NotAModelError, match="could not be fetched from the Hugging Face Hub"):
        ColBERT.from_pretrained("edgeplaid-tests/definitely-not-cached")


def test_missing_dense_weights(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dirs["bert"], copy)
    (copy / "1_Dense" / "model.safetensors").unlink()
    with pytest.raises(NotAModelError, match=r"no model\.safetensors or pytorch_model\.bin"):
        ColBERT.from_pretrained(copy)


def test_bad_options(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="dtype"):
        ColBERT.from_pretrained(model_dirs["bert"], dtype="int8")
    with pytest.raises(ValueError, match="query_length"):
        ColBERT.from_pretrained(model_dirs["bert"], query_length=1)
    with pytest.raises(ValueError, match="projection_dim applies to zero-shot"):
        ColBERT.from_pretrained(model_dirs["bert"], projection_dim=16)
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        ColBERT.from_pretrained(model_dirs["bert"], query_prefix="[NEWTOKEN]")


def test_dense_from_pytorch_bin(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Heads saved as pytorch_model.bin (older sentence-transformers) load the same."""
    import shutil

    import torch
    from safetensors.torch import load_file

    copy = tmp_path / "bin"
    shutil.copytree(model_dirs["bert"], copy)
    st = copy / "1_Dense" / "model.safetensors"
    torch.save(load_file(str(st)), copy / "1_Dense" / "pytorch_model.bin")
    st.unlink()
    a = ColBERT.from_pretrained(model_dirs["bert"]).encode_documents(["same text"])[0]
    b = ColBERT.from_pretrained(copy).encode_documents(["same text"])[0]
    assert torch.equal(a, b)
