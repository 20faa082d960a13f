"""Checkpoint discovery and loading: PyLate / sentence-transformers layout, Stanford ``HF_ColBERT``
layout, and plain encoders (zero-shot). No model code lives here, only files -> settings + tensors."""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Activation names PyLate / sentence-transformers write into a Dense module's config.json
# (``fullname(module)``). PyLate's own Dense uses Identity; sentence-transformers' default is Tanh.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "torch.nn.modules.linear.Identity": nn.Identity,
    "torch.nn.modules.activation.Tanh": nn.Tanh,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.modules.activation.GELU": nn.GELU,
    "torch.nn.modules.activation.Sigmoid": nn.Sigmoid,
    "torch.nn.modules.activation.SiLU": nn.SiLU,
}


class NotAModelError(ValueError):
    """The path is neither a model directory nor a Hub id that resolves to one."""


@dataclass
class Settings:
    """Tokenisation and output settings, with PyLate's precedence: explicit argument > checkpoint
    config > PyLate default (``"[Q] "``/``"[D] "``, 32/180, punctuation skiplist, expansion on)."""

    query_prefix: str | None = None
    document_prefix: str | None = None
    query_length: int | None = None
    document_length: int | None = None
    do_query_expansion: bool | None = None
    attend_to_expansion_tokens: bool | None = None
    skiplist_words: list[str] | None = None
    do_lower_case: bool = False

    def resolve(self, zero_shot: bool, max_seq_length: int | None) -> None:
        """Fills every unset field with PyLate's default (or the zero-shot one)."""
        if zero_shot:
            # A plain encoder never saw [Q]/[D] or expansion tokens: adding them would need new,
            # untrained embedding rows, so the zero-shot encoder goes without.
            self.query_prefix = "" if self.query_prefix is None else self.query_prefix
            self.document_prefix = "" if self.document_prefix is None else self.document_prefix
            self.do_query_expansion = bool(self.do_query_expansion)
            default_doc = min(max_seq_length or 512, 512)
        else:
            default_doc = 180
        if self.query_prefix is None:
            self.query_prefix = "[Q] "
        if self.document_prefix is None:
            self.document_prefix = "[D] "
        if self.query_length is None:
            self.query_length = 32
        if self.document_length is None:
            self.document_length = default_doc
        if self.skiplist_words is None:
            self.skiplist_words = list(string.punctuation)
        if self.do_query_expansion is None:
            self.do_query_expansion = True
        if self.attend_to_expansion_tokens is None:
            self.attend_to_expansion_tokens = False
        if not self.do_query_expansion:
            self.attend_to_expansion_tokens = False
        for name in ("query_length", "document_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 3:
                raise ValueError(f"{name} must be an int >= 3, got {value!r}")


@dataclass
class Checkpoint:
    """What a model directory holds, in the form the encoder needs."""

    root: Path
    transformer_dir: Path  # where config.json, the weights and the tokenizer of the backbone live
    layout: str  # "pylate" | "stanford" | "zero_shot"
    settings: Settings
    dense_dirs: list[Path] = field(default_factory=list)
    max_seq_length: int | None = None


def resolve_path(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub id through huggingface_hub's cache (which honours
    ``HF_HUB_OFFLINE``). Raises :class:`NotAModelError` when neither works."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise NotAModelError(f"{text!r} is a file, not a model directory")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise NotAModelError(f"{text!r} is not a directory, and not a Hub id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                text,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "artifact.metadata"],
            )
        )
    except Exception as exc:  # network, auth, offline-miss: one clear error for all of them
        raise NotAModelError(
            f"{text!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_checkpoint(root: Path, overrides: Settings) -> Checkpoint:
    """Reads modules.json / config_sentence_transformers.json / artifact.metadata under ``root``."""
    modules_file = root / "modules.json"
    settings = overrides
    if modules_file.is_file():
        modules = _read_json(modules_file)
        transformer_dir = None
        dense_dirs: list[Path] = []
        for module in sorted(modules, key=lambda m: int(m.get("idx", 0))):
            kind = str(module.get("type", ""))
            sub = root / module.get("path", "")
            if kind.endswith(".Transformer"):
                if transformer_dir is not None:
                    raise NotAModelError(f"{root}: more than one Transformer module in modules.json")
                transformer_dir = sub
            elif kind.endswith(".Dense"):
                dense_dirs.append(sub)
            elif kind.endswith((".Pooling", ".Normalize")):
                # A sentence-embedding head: pooling is dropped, tokens are normalised anyway.
                continue
            else:
                raise NotAModelError(f"{root}: unsupported module type {kind!r} in modules.json")
        if transformer_dir is None:
            raise NotAModelError(f"{root}: modules.json lists no Transformer module")
        st_config = transformer_dir / "sentence_bert_config.json"
        bert_cfg = _read_json(st_config) if st_config.is_file() else {}
        settings.do_lower_case = bool(bert_cfg.get("do_lower_case", False))
        max_seq_length = bert_cfg.get("max_seq_length")
        cfg_file = root / "config_sentence_transformers.json"
        cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
        for key in (
            "query_prefix",
            "document_prefix",
            "query_length",
            "document_length",
            "attend_to_expansion_tokens",
            "skiplist_words",
            "do_query_expansion",
        ):
            if getattr(settings, key) is None and key in cfg:
                setattr(settings, key, cfg[key])
        if not (transformer_dir / "config.json").is_file():
            raise NotAModelError(f"{transformer_dir}: no config.json for the Transformer module")
        layout = "pylate" if dense_dirs else "zero_shot"
        architectures = _read_json(transformer_dir / "config.json").get("architectures") or []
        if not dense_dirs and architectures and architectures[0] == "HF_ColBERT":
            # A Stanford checkpoint with a sentence-transformers modules.json added (e.g.
            # mxbai-colbert-large-v1): PyLate takes the head from ``linear.weight``.
            layout = "stanford"
            _apply_stanford_metadata(root, settings)
        checkpoint = Checkpoint(root, transformer_dir, layout, settings, dense_dirs, max_seq_length)
    elif (root / "config.json").is_file():
        config = _read_json(root / "config.json")
        architectures = config.get("architectures") or []
        if architectures and architectures[0] == "HF_ColBERT":
            _apply_stanford_metadata(root, settings)
            checkpoint = Checkpoint(root, root, "stanford", settings)
        else:
            checkpoint = Checkpoint(root, root, "zero_shot", settings, max_seq_length=None)
    else:
        raise NotAModelError(
            f"{root} is not a model directory: it has neither modules.json (PyLate / sentence-transformers) "
            "nor config.json (transformers)"
        )
    checkpoint.settings.resolve(checkpoint.layout == "zero_shot", checkpoint.max_seq_length)
    return checkpoint


def _apply_stanford_metadata(root: Path, settings: Settings) -> None:
    """PyLate's Stanford rules: artifact.metadata values where nothing else set them, prefixes
    defaulting to [unused0]/[unused1]; lengths only from the metadata."""
    meta_file = root / "artifact.metadata"
    meta = _read_json(meta_file) if meta_file.is_file() else {}
    if settings.query_prefix is None:
        settings.query_prefix = meta.get("query_token_id") or "[unused0]"
    if settings.document_prefix is None:
        settings.document_prefix = meta.get("doc_token_id") or "[unused1]"
    if settings.query_length is None:
        settings.query_length = meta.get("query_maxlen")
    if settings.document_length is None:
        settings.document_length = meta.get("doc_maxlen")
    if settings.attend_to_expansion_tokens is None:
        settings.attend_to_expansion_tokens = meta.get("attend_to_mask_tokens")


def _load_state_dict(directory: Path, only: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """model.safetensors, else pytorch_model.bin (loaded with ``weights_only``)."""
    st_file = directory / "model.safetensors"
    if st_file.is_file():
        from safetensors import safe_open

        with safe_open(str(st_file), framework="pt", device="cpu") as f:
            keys = [k for k in f.keys() if only is None or k in only]
            return {k: f.get_tensor(k) for k in keys}
    bin_file = directory / "pytorch_model.bin"
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if only is None or k in only}
    raise NotAModelError(f"{directory}: no model.safetensors or pytorch_model.bin")


class DenseLayer(nn.Module):
    """PyLate's Dense: ``y = act(x W^T + b)`` plus, with ``use_residual``, ``x`` (or ``x R^T`` when the
    widths differ). Works on any ``(..., in_features)`` tensor."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, activation: nn.Module, use_residual: bool
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation = activation
        self.use_residual = use_residual
        self.residual = (
            nn.Linear(in_features, out_features, bias=False)
            if use_residual and in_features != out_features
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.linear(x))
        if self.use_residual:
            y = y + (self.residual(x) if self.residual is not None else x)
        return y


def load_dense(directory: Path) -> DenseLayer:
    """One PyLate / sentence-transformers Dense module folder (config.json + weights)."""
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise NotAModelError(f"{directory}: Dense module without config.json")
    cfg = _read_json(cfg_file)
    act_name = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if act_name not in _ACTIVATIONS:
        raise NotAModelError(f"{directory}: unsupported activation_function {act_name!r}")
    layer = DenseLayer(
        int(cfg["in_features"]),
        int(cfg["out_features"]),
        bool(cfg.get("bias", True)),
        _ACTIVATIONS[act_name](),
        bool(cfg.get("use_residual", False)),
    )
    state = _load_state_dict(directory)
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NotAModelError(
            f"{directory}: Dense weights do not match its config (missing {missing}, unexpected {unexpected})"
        )
    return layer


def load_stanford_linear(root: Path) -> DenseLayer:
    """The ``linear`` projection (no bias) of a Stanford ``HF_ColBERT`` checkpoint."""
    state = _load_state_dict(root, only=("linear.weight",))
    if "linear.weight" not in state:
        raise NotAModelError(f"{root}: HF_ColBERT checkpoint without a 'linear.weight' tensor")
    weight = state["linear.weight"]
    layer = DenseLayer(weight.shape[1], weight.shape[0], False, nn.Identity(), False)
    layer.linear.weight.data.copy_(weight)
    return layer
