"""The ColBERT encoder: loads PyLate / Stanford / plain checkpoints and encodes queries and documents
exactly as PyLate's ``ColBERT.encode`` does (same tokens, same masks, same vectors), only faster."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from edgeplaid.model._checkpoint import (
    Checkpoint,
    DenseLayer,
    NotAModelError,
    Settings,
    load_dense,
    load_stanford_linear,
    read_checkpoint,
    resolve_path,
)
from edgeplaid.model._modernbert import PackedLinears, PackedModernBert
from edgeplaid.model._precision import (
    DTYPE_OF,
    INT8_DTYPES,
    PRECISIONS,
    calibrate_int8,
    int8_dtype,
    resolve_precision,
    set_int8,
)

__all__ = ["ColBERT", "NotAModelError"]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

# Padded positions per batch of documents when neither batch_size nor max_tokens is given
# (benchmarks/bench_encode.py measured the CPU's).
_DOC_TOKENS_CPU = 4096
_DOC_TOKENS_GPU = 32768

# Inputs at least this long get a progress bar when ``show_progress_bar`` is left to None.
_PROGRESS_MIN_TEXTS = 2048


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def _check_texts(texts: str | Sequence[str], what: str) -> list[str]:
    """A list of non-empty strings (a bare string counts as a list of one); raises otherwise."""
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or not isinstance(texts, Iterable):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{what}[{i}] is empty (or only whitespace): nothing to encode")
    return texts


class ColBERT(nn.Module):
    """A late-interaction encoder: transformer backbone + linear head, L2-normalised token vectors.

    Build it with :meth:`from_pretrained`. Tokenisation follows PyLate: the prefix token ([Q]/[D]) is
    inserted after the first special token and counts towards ``query_length``/``document_length``;
    queries are padded with the mask token to ``query_length`` when ``do_query_expansion``; document
    tokens in the skiplist (punctuation) are dropped from the output.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: Sequence[nn.Module],
        tokenizer,  # transformers.PreTrainedTokenizerBase
        settings: Settings,
        layout: str,
        name_or_path: str = "",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.ModuleList(head)
        self.tokenizer = tokenizer
        self.settings = settings
        self.layout = layout
        self.name_or_path = name_or_path

        s = settings
        prefixes = [p for p in (s.query_prefix, s.document_prefix) if p]
        if prefixes:
            # PyLate adds the prefixes as tokens (a no-op when the tokenizer already has them).
            tokenizer.add_tokens(prefixes)
        self.query_prefix_id = tokenizer.convert_tokens_to_ids(s.query_prefix) if s.query_prefix else None
        self.document_prefix_id = (
            tokenizer.convert_tokens_to_ids(s.document_prefix) if s.document_prefix else None
        )
        n_rows = backbone.get_input_embeddings().weight.shape[0]
        prefix_ids = (("query_prefix", self.query_prefix_id), ("document_prefix", self.document_prefix_id))
        for name, tid in prefix_ids:
            if tid is not None and tid >= n_rows:
                raise ValueError(
                    f"{name} {getattr(s, name)!r} is not in the model's vocabulary (token id {tid} >= "
                    f"{n_rows} embedding rows); PyLate would add an untrained embedding for it"
                )
        # Pad with the mask token (query expansion), as PyLate; else EOS, else the tokenizer's pad.
        if tokenizer.mask_token_id is not None:
            self.pad_id = tokenizer.mask_token_id
        elif tokenizer.eos_token_id is not None:
            self.pad_id = tokenizer.eos_token_id
        elif tokenizer.pad_token_id is not None:
            self.pad_id = tokenizer.pad_token_id
        else:
            raise ValueError("the tokenizer has no mask, EOS or pad token to pad with")
        # PyLate maps each skiplist word with convert_tokens_to_ids; unknown words map to the UNK id
        # (and so mask UNK tokens): kept as is for parity.
        skip = {tokenizer.convert_tokens_to_ids(w) for w in s.skiplist_words}
        skip.discard(None)
        self.register_buffer("skiplist_ids", torch.tensor(sorted(skip), dtype=torch.long), persistent=False)
        # ModernBERT on CPU runs edgeplaid's own forward (_modernbert.py: oneDNN linear layers,
        # blocked sliding-window attention; same outputs to float32 rounding, about 1.8x faster than
        # transformers' on a 2-core EPYC). ``use_fast_forward``: None (default) = on CPU only (on
        # GPUs transformers' forward is unchanged and unmeasured against it), True = everywhere,
        # False = never. Kept out of the module tree: it only references ``backbone``'s parameters
        # (and caches oneDNN-packed copies of them, re-made when they change).
        linears = PackedLinears()
        packed = None
        if PackedModernBert.supports(backbone):
            packed = PackedModernBert(backbone, linears)
        self.__dict__["_linears"] = linears
        self.__dict__["_packed"] = packed
        self.use_fast_forward: bool | None = None
        self.__dict__["_precision"] = "fp32"
        self.eval()

    def _apply(self, fn, *args, **kwargs):
        def state() -> list[tuple]:
            return [(p, p.data_ptr(), p.dtype, p.device, p._version) for p in self.parameters()]

        before, ranges = state(), dict(self._linears.act_amax)
        self._linears.clear()  # .to() / .half() / ... replace the parameters: drop packed copies
        out = super()._apply(fn, *args, **kwargs)
        int8 = self.__dict__.get("_precision") == "int8"
        if int8 and self.device.type == "cpu" and self.dtype in INT8_DTYPES:
            after = state()
            same = len(after) == len(before) and all(
                a[0] is b[0] and a[1:] == b[1:] for a, b in zip(after, before, strict=True)
            )
            if same and ranges:  # nothing moved or changed (e.g. .to() the current device)
                self._linears.act_amax.update(ranges)
            else:
                calibrate_int8(self)  # the calibration was keyed by the replaced parameters
        return out

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        *,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        query_length: int | None = None,
        document_length: int | None = None,
        do_query_expansion: bool | None = None,
        attend_to_expansion_tokens: bool | None = None,
        skiplist_words: list[str] | None = None,
        projection_dim: int | None = None,
        projection_texts: Sequence[str] | None = None,
        precision: str = "auto",
    ) -> ColBERT:
        """Loads a checkpoint directory (or Hub id, through huggingface_hub's cache).

        Layouts: PyLate / sentence-transformers (``modules.json``, ``N_Dense/`` head folders,
        ``config_sentence_transformers.json``), Stanford ``HF_ColBERT`` (BERT + ``linear``), and a plain
        encoder (e.g. all-MiniLM-L6-v2: no head; a zero-shot encoder, optionally with a fixed PCA
        projection to ``projection_dim`` fitted on ``projection_texts`` or on a built-in
        vocabulary sample). Keyword settings override the checkpoint's, as PyLate's do.
        ``precision``: "auto" (default), "fp32", "bf16", "fp16" or "int8" (see :attr:`precision`);
        "auto" on CPUs: bf16 with AMX; int8 on bf16 weights with AVX512-BF16 and VNNI but no AMX
        (Zen 4); bf16 with AVX512-BF16 otherwise; without native bf16 int8 for ModernBERT
        backbones, and for others where the int8 kernels run AVX-512 VNNI, else float32 (float32
        without the C++ extension); bf16/fp16 on GPUs.
        ``dtype``: float32, float16 or bfloat16 weights and compute, the same as precision
        "fp32"/"fp16"/"bf16". Outputs are float32 whatever the precision.
        """
        from transformers import AutoModel, AutoTokenizer

        explicit = _as_dtype(dtype) if dtype is not None else None
        resolve_precision(precision, torch.device(device), explicit)  # bad arguments fail before loading
        root = resolve_path(name_or_path)
        overrides = Settings(
            query_prefix=query_prefix,
            document_prefix=document_prefix,
            query_length=query_length,
            document_length=document_length,
            do_query_expansion=do_query_expansion,
            attend_to_expansion_tokens=attend_to_expansion_tokens,
            skiplist_words=list(skiplist_words) if skiplist_words is not None else None,
        )
        ckpt: Checkpoint = read_checkpoint(root, overrides)
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.transformer_dir))
        backbone = AutoModel.from_pretrained(
            str(ckpt.transformer_dir), attn_implementation="sdpa", dtype=torch.float32
        )
        head: list[nn.Module]
        if ckpt.layout == "pylate":
            head = [load_dense(d) for d in ckpt.dense_dirs]
        elif ckpt.layout == "stanford":
            head = [load_stanford_linear(ckpt.transformer_dir)]
        else:
            head = []
        if projection_dim is not None and ckpt.layout != "zero_shot":
            raise ValueError("projection_dim applies to zero-shot encoders only (this checkpoint has a head)")
        model = cls(backbone, head, tokenizer, ckpt.settings, ckpt.layout, str(name_or_path))
        own = model._packed is not None
        precision = resolve_precision(precision, torch.device(device), explicit, own_forward=own)
        torch_dtype = DTYPE_OF[precision]
        if precision == "int8":
            torch_dtype = explicit if explicit is not None else int8_dtype()
        if projection_dim is not None:
            model._fit_pca(projection_dim, projection_texts)  # in float32, whatever the precision
        model = model.to(device=torch.device(device), dtype=torch_dtype)
        model.precision = precision
        return model

    def _fit_pca(self, dim: int, texts: Sequence[str] | None) -> None:
        """Appends a fixed PCA projection (centred, top-``dim`` components) of the token vectors."""
        hidden = self.output_dim
        if not 1 <= dim <= hidden:
            raise ValueError(f"projection_dim must be in [1, {hidden}], got {dim}")
        if texts is None:
            texts = _calibration_texts(self.tokenizer)
        tokens, _ = self.encode_documents(list(texts), normalize=False)
        tokens = tokens.double()
        mean = tokens.mean(0)
        # Right singular vectors of the centred tokens = principal axes; the sign is fixed so the
        # projection does not depend on the SVD backend.
        _, _, vh = torch.linalg.svd(tokens - mean, full_matrices=False)
        axes = vh[:dim]
        axes = axes * torch.where(axes.sum(1, keepdim=True) < 0, -1.0, 1.0)
        proj = nn.Linear(hidden, dim, bias=True)
        proj.weight.data.copy_(axes.float())
        proj.bias.data.copy_(-(axes @ mean).float())
        layer = DenseLayer(hidden, dim, True, nn.Identity(), False)
        layer.linear = proj
        self.head.append(layer)

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    @property
    def precision(self) -> str:
        """The compute precision: "fp32" (PyLate's outputs to float32 rounding), "int8" (linear
        layers with int8 weights per channel and int8 activations per token, smoothed by factors
        calibrated on the shipped sample text when set, the MLP's output projection's rows
        rotated by Hadamard blocks instead; CPU only), "bf16" or "fp16" (the weights' dtype). Setting it
        switches between "fp32" and "int8" in place; "bf16"/"fp16" need ``from_pretrained``
        (or ``.to(dtype)``)."""
        return self.__dict__["_precision"]

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in PRECISIONS or value == "auto":
            raise ValueError(f"precision: expected one of {PRECISIONS[1:]}, got {value!r}")
        if DTYPE_OF[value] != self.dtype and not (value == "int8" and self.dtype in INT8_DTYPES):
            raise ValueError(
                f"precision {value!r} needs {DTYPE_OF[value]} weights, the model's are {self.dtype}: "
                "load it with ColBERT.from_pretrained(..., precision=...)"
            )
        if value == "int8" and self.device.type != "cpu":
            raise ValueError(
                "precision 'int8' runs on the CPU (its kernel is C++); use 'bf16' or 'fp16' on GPUs"
            )
        int8 = value == "int8"
        previous = self.__dict__.get("_precision", "fp32")
        self._linears.int8 = int8
        set_int8(self.backbone, int8, self._linears.act_amax)
        self.__dict__["_precision"] = value
        if int8:
            try:
                calibrate_int8(self)  # smoothing factors for the int8 layers (_precision.py)
            except BaseException:  # not left half-switched: int8 on, uncalibrated
                self._linears.int8 = previous == "int8"
                set_int8(self.backbone, previous == "int8", self._linears.act_amax)
                self.__dict__["_precision"] = previous
                raise

    @property
    def output_dim(self) -> int:
        """Width of the token vectors (48 for mxbai-edge-colbert-v0 17m, 64 for 32m)."""
        if len(self.head):
            return self.head[-1].out_features
        return self.backbone.config.hidden_size

    # ------------------------------------------------------------------ tokenisation

    def _preprocess(self, texts: list[str]) -> list[str]:
        # sentence-transformers' Transformer.tokenize: strip, then lowercase when do_lower_case.
        texts = [t.strip() for t in texts]
        if self.settings.do_lower_case:
            texts = [t.lower() for t in texts]
        return texts

    def tokenize(self, texts: str | Sequence[str], is_query: bool) -> list[list[int]]:
        """Token ids per text, prefix inserted, truncated (warns once if any text was), unpadded."""
        what = "queries" if is_query else "documents"
        texts = self._preprocess(_check_texts(texts, what))
        s = self.settings
        prefix_id = self.query_prefix_id if is_query else self.document_prefix_id
        max_len = s.query_length if is_query else s.document_length
        if prefix_id is not None:
            max_len -= 1  # the prefix counts towards the length
        if not texts:
            return []
        enc = self.tokenizer(
            texts,
            truncation="longest_first",
            max_length=max_len,
            return_overflowing_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        rows = enc["input_ids"]
        mapping = enc.get("overflow_to_sample_mapping")
        if mapping is None:  # slow tokenizers: no overflow mapping; detect by re-tokenising
            ids = rows
            n_cut = sum(
                len(self.tokenizer(t, truncation=False)["input_ids"]) > max_len
                for t, r in zip(texts, ids, strict=True)
                if len(r) == max_len
            )
        else:
            ids = [None] * len(texts)
            rows_per_text = [0] * len(texts)
            for row, sample in zip(rows, mapping, strict=True):
                if ids[sample] is None:
                    ids[sample] = row
                rows_per_text[sample] += 1
            n_cut = sum(c > 1 for c in rows_per_text)
        if n_cut:
            limit = s.query_length if is_query else s.document_length
            warnings.warn(
                f"{n_cut} of {len(texts)} {what} exceeded the length limit of {limit} tokens "
                "(prefix and special tokens included) and were truncated",
                UserWarning,
                stacklevel=3,
            )
        if prefix_id is not None:
            ids = [[r[0], prefix_id, *r[1:]] for r in ids]
        return ids

    # ------------------------------------------------------------------ forward

    def _forward(
        self,
        input_ids: torch.Tensor,
        key_mask: torch.Tensor,
        compute_mask: torch.Tensor,
        out_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token vectors (not normalised) of one padded batch.

        Args:
            input_ids: ``(B, L) int64``; key_mask: ``(B, L) bool``, the attention mask (keys);
            compute_mask: ``(B, L) bool``, positions run through the backbone as queries;
            out_mask: ``(T,) bool`` over those positions, the ones to project (default: all).

        Returns:
            ``(T', output_dim) float32``, the selected positions in row-major order.
        """
        fast = self.use_fast_forward
        if fast is None:
            fast = input_ids.device.type == "cpu"
        if fast and self._packed is not None:
            hidden = self._packed(input_ids, key_mask, compute_mask)
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=key_mask.long()).last_hidden_state
            hidden = hidden[compute_mask]
        if out_mask is not None:
            hidden = hidden[out_mask]
        for layer in self.head:
            hidden = self._head_layer(layer, hidden)
        return hidden.float()

    def _head_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``, with a Dense layer's products through the oneDNN linears."""
        lin = self._linears
        # (and through them while calibrating, so that int8 finds the head's input ranges)
        packed = lin.uses_onednn(x) or lin.uses_int8(x) or lin.calibrating
        if not isinstance(layer, DenseLayer) or not packed:
            return layer(x)
        y = layer.activation(self._linears.linear(layer.linear, x))
        if layer.use_residual:
            y = y + (self._linears.linear(layer.residual, x) if layer.residual is not None else x)
        return y

    def _batches(
        self,
        ids: list[list[int]],
        batch_size: int | None,
        desc: str,
        show_progress_bar: bool | None,
        max_tokens: int | None = None,
    ) -> Iterator[tuple[list[int], list[list[int]]]]:
        """Longest first; each batch holds at most ``batch_size`` sequences and, with
        ``max_tokens``, at most ``max_tokens`` padded positions (its longest sequence times its
        size; one sequence at least): yields (original indices, token ids)."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if batch_size is None and max_tokens is None:
            raise ValueError("give batch_size or max_tokens")
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        chunks: list[list[int]] = []
        start = 0
        while start < len(order):
            size = batch_size or len(order)
            if max_tokens is not None:  # the batch's first sequence is its longest
                size = min(size, max(1, max_tokens // max(1, len(ids[order[start]]))))
            chunks.append(order[start : start + size])
            start += size
        if show_progress_bar is None:
            show_progress_bar = len(ids) >= _PROGRESS_MIN_TEXTS
        if show_progress_bar:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=desc, unit="batch")
        for chunk in chunks:
            yield chunk, [ids[i] for i in chunk]

    def _pad(self, rows: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, length) int64 ids padded with the pad (mask) token, and the (B, length) bool mask."""
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return input_ids, mask

    def encode_queries(
        self,
        texts: str | Sequence[str],
        batch_size: int = 64,
        show_progress_bar: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes queries (sorted by length and batched ``batch_size`` at a time).

        Returns ``embeddings (nq, Lq, dim) float32`` (L2-normalised rows; zeros where masked) and
        ``mask (nq, Lq) bool``. With query expansion ``Lq = query_length`` and every position is valid
        (the mask-token expansions are part of the query); without it ``Lq`` is the longest query and
        the mask marks real tokens. Both on the model's device.
        """
        ids = self.tokenize(texts, is_query=True)
        with torch.inference_mode():  # tokenize (and its warning) stays outside
            s = self.settings
            nq = len(ids)
            dim = self.output_dim
            if nq == 0:
                empty = torch.zeros((0, 0, dim), device=self.device)
                return empty, torch.zeros((0, 0), dtype=torch.bool, device=self.device)
            lq = s.query_length if s.do_query_expansion else max(len(r) for r in ids)
            out = torch.zeros((nq, lq, dim), dtype=torch.float32, device=self.device)
            out_mask = torch.zeros((nq, lq), dtype=torch.bool, device=self.device)
            for idx, rows in self._batches(ids, batch_size, "Encoding queries", show_progress_bar):
                length = lq if s.do_query_expansion else max(len(r) for r in rows)
                input_ids, valid = self._pad(rows, length)
                input_ids, valid = input_ids.to(self.device), valid.to(self.device)
                attn = torch.ones_like(valid) if s.attend_to_expansion_tokens else valid
                # Expansion: every position is part of the query, attended to or not.
                keep = torch.ones_like(valid) if s.do_query_expansion else valid
                vectors = torch.nn.functional.normalize(self._forward(input_ids, attn, keep), p=2, dim=-1)
                emb = vectors.new_zeros((len(rows), length, dim))
                emb[keep] = vectors
                index = torch.as_tensor(idx, device=self.device)
                out[index, :length] = emb
                out_mask[index, :length] = keep
            return out, out_mask

    def encode_documents(
        self,
        texts: str | Sequence[str],
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        normalize: bool = True,
        max_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes documents into the packed form the index and ``maxsim_packed`` take.

        Documents are sorted by token count and run in batches filled to ``max_tokens`` padded
        positions (default 4,096 on CPUs, 32,768 on GPUs; measured in benchmarks/bench_encode.py),
        or ``batch_size`` documents at a time when that alone is given; ``normalize=False`` returns
        the raw projected vectors.

        Returns ``tokens (n_tokens, dim) float32`` — each document's kept tokens (attention mask and
        not in the skiplist), L2-normalised, documents concatenated in input order — and
        ``doclens (nd,) int64`` (token count per document). Both on the model's device.
        """
        ids = self.tokenize(texts, is_query=False)
        with torch.inference_mode():  # tokenize (and its warning) stays outside
            nd = len(ids)
            dim = self.output_dim
            if nd == 0:
                return torch.zeros((0, dim), device=self.device), torch.zeros(
                    0, dtype=torch.long, device=self.device
                )
            if batch_size is None and max_tokens is None:
                max_tokens = _DOC_TOKENS_CPU if self.device.type == "cpu" else _DOC_TOKENS_GPU
            per_doc: list[torch.Tensor | None] = [None] * nd
            skip = self.skiplist_ids.to(self.device)
            batches = self._batches(ids, batch_size, "Encoding documents", show_progress_bar, max_tokens)
            for idx, rows in batches:
                input_ids, attn = self._pad(rows, max(len(r) for r in rows))
                input_ids = input_ids.to(self.device)
                attn = attn.to(self.device)
                keep = attn & ~torch.isin(input_ids, skip)
                # Skiplist tokens still feed attention but skip the head.
                kept = self._forward(input_ids, attn, attn, out_mask=keep[attn])
                if normalize:
                    kept = torch.nn.functional.normalize(kept, p=2, dim=-1)
                counts = keep.sum(1).tolist()
                for i, part in zip(idx, torch.split(kept, counts), strict=True):
                    per_doc[i] = part
            doclens = torch.tensor([p.shape[0] for p in per_doc], dtype=torch.long, device=self.device)
            return torch.cat(per_doc), doclens

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"layout={self.layout}, dim={self.output_dim}, query_length={s.query_length}, "
            f"document_length={s.document_length}, expansion={s.do_query_expansion}"
        )


def _calibration_texts(tokenizer, n_texts: int = 32, words: int = 64) -> list[str]:
    """A fixed pseudo-corpus for the zero-shot PCA: whole-word vocabulary entries in a seeded order."""
    vocab = sorted(tok for tok in tokenizer.get_vocab() if tok.isalpha() and len(tok) > 2)
    if not vocab:
        raise ValueError("cannot build calibration texts from this vocabulary; pass projection_texts")
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(len(vocab), (n_texts, words), generator=g).tolist()
    return [" ".join(vocab[j] for j in row) for row in picks]
