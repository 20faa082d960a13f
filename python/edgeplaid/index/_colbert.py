"""Import of PLAID indexes written by colbert-ai (Stanford ColBERT v2, ``colbert/indexing``).

colbert-ai's layout (read from its source: codecs/residual.py, collection_indexer.py,
index_saver.py, utils.optimize_ivf)::

    metadata.json (or plan.json)  {"config": {"dim", "nbits", ...}, "num_chunks", "num_partitions", ...}
    centroids.pt                  (C, dim) float16
    avg_residual.pt               scalar / (1,) / (dim,) tensor
    buckets.pt                    (bucket_cutoffs (2**nbits - 1,), bucket_weights (2**nbits,))
    N.codes.pt                    (n_chunk_tokens,) integer centroid ids, chunk N
    N.residuals.pt                (n_chunk_tokens, dim * nbits / 8) uint8
    doclens.N.json                [tokens per passage of chunk N]
    ivf.pid.pt                    (ivf pids (>= sum(lengths); zero padding after), lengths (C,))
    ivf.pt                        older: (ivf embedding ids, lengths (C,)) -> mapped to pids

Residual bits: colbert-ai's ``binarize`` writes, for each dimension d in order, the bits of its
bucket index least significant first, into a bit stream packed most-significant-bit first
(``np.packbits``). edgeplaid's rows are little-endian bit strings with dimension d at bits
[d * nbits, (d + 1) * nbits): the importer unpacks colbert-ai's stream and repacks, so every
bucket index, and therefore every decompressed vector
(normalize(centroid[code] + bucket_weights[bucket])), is the one colbert-ai decompresses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgeplaid.index._build import build_ivf
from edgeplaid.index._codec import inv_norms, pack_buckets
from edgeplaid.index._storage import IndexWriter


class ColbertImportError(ValueError):
    """The source directory is not a readable colbert-ai PLAID index."""


def _load(path: Path):
    if not path.exists():
        raise ColbertImportError(f"{path.parent}: missing {path.name} (not a colbert-ai index?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on a bad pickle
        raise ColbertImportError(f"{path}: unreadable ({e})") from e


def colbert_buckets(residuals: np.ndarray, dim: int, nbits: int) -> np.ndarray:
    """colbert-ai packed residuals (n, dim * nbits / 8) uint8 -> bucket indices (n, dim) uint8."""
    bits = np.unpackbits(residuals, axis=1).reshape(residuals.shape[0], dim, nbits)
    weights = (1 << np.arange(nbits, dtype=np.uint8)).astype(np.uint8)
    return (bits * weights).sum(axis=2, dtype=np.uint8)


def import_colbert(src: Path, dst: Path, overwrite: bool = False) -> None:
    """Writes the edgeplaid index ``dst`` holding colbert-ai index ``src`` (see module docstring)."""
    meta_path = src / "metadata.json"
    if not meta_path.exists():
        meta_path = src / "plan.json"
    if not meta_path.exists():
        raise ColbertImportError(f"{src}: neither metadata.json nor plan.json (not a colbert-ai index?)")
    meta = json.loads(meta_path.read_text())
    config = meta.get("config", {})
    nbits = int(config.get("nbits", meta.get("nbits", 0)))
    num_chunks = int(meta["num_chunks"])

    centroids = _load(src / "centroids.pt").float().contiguous()
    n_cent, dim = centroids.shape
    if "dim" in config and int(config["dim"]) != dim:
        raise ColbertImportError(f"{src}: config dim {config['dim']} != centroids dim {dim}")
    cutoffs, weights = _load(src / "buckets.pt")
    cutoffs = cutoffs.float().numpy().reshape(-1)
    weights = weights.float().numpy().reshape(-1)
    if nbits == 0:
        nbits = round(float(np.log2(weights.shape[0])))
    if weights.shape[0] != 1 << nbits:
        raise ColbertImportError(f"{src}: {weights.shape[0]} bucket weights for nbits={nbits}")
    avg_path = src / "avg_residual.pt"
    avg = float(_load(avg_path).float().mean()) if avg_path.exists() else 0.0

    doclens_l: list[int] = []
    with IndexWriter(dst, overwrite=overwrite) as w:
        codes_parts = []
        w.begin_array("residuals", np.uint8, (dim * nbits // 8,))
        w.begin_array("inv_norm", np.float32)
        stored_centroids = centroids.numpy().astype(np.float16).astype(np.float32)
        for c in range(num_chunks):
            dl = json.loads((src / f"doclens.{c}.json").read_text())
            codes = _load(src / f"{c}.codes.pt").numpy().reshape(-1)
            res = _load(src / f"{c}.residuals.pt").numpy()
            if res.shape != (codes.shape[0], dim * nbits // 8) or sum(dl) != codes.shape[0]:
                raise ColbertImportError(
                    f"{src}: chunk {c}: {codes.shape[0]} codes, residuals {res.shape}, "
                    f"{sum(dl)} tokens in doclens"
                )
            doclens_l.extend(int(x) for x in dl)
            codes_parts.append(codes.astype(np.int64))
            packed = pack_buckets(colbert_buckets(res, dim, nbits), nbits)
            w.append("residuals", packed)
            if codes.shape[0] and (codes.min() < 0 or codes.max() >= n_cent):
                raise ColbertImportError(f"{src}: chunk {c}: codes outside [0, {n_cent})")
            w.append("inv_norm", inv_norms(codes.astype(np.int64), packed, stored_centroids, weights, nbits))
        w.end_array("residuals")
        w.end_array("inv_norm")
        codes = np.concatenate(codes_parts) if codes_parts else np.zeros(0, np.int64)
        if codes.shape[0] and (codes.min() < 0 or codes.max() >= n_cent):
            raise ColbertImportError(f"{src}: codes outside [0, {n_cent})")
        doclens = np.asarray(doclens_l, dtype=np.int64)
        # The IVF is rebuilt from the codes: by colbert-ai's construction (optimize_ivf) it equals
        # ivf.pid.pt's lists; checked against the file when present.
        ivf_offsets, ivf_docs = build_ivf(codes, doclens, n_cent)
        ivf_file = src / "ivf.pid.pt"
        if ivf_file.exists():
            ivf, lengths = _load(ivf_file)
            lengths = lengths.numpy().astype(np.int64)
            total = int(lengths.sum())
            theirs = ivf.numpy().reshape(-1)[:total]
            if (
                lengths.shape[0] != n_cent
                or not np.array_equal(np.diff(ivf_offsets), lengths)
                or not (np.array_equal(theirs.astype(np.int64), ivf_docs.astype(np.int64)))
            ):
                raise ColbertImportError(f"{src}: ivf.pid.pt disagrees with the codes and doclens")
        w.write_array("centroids", centroids.numpy().astype(np.float16))  # colbert-ai's fp16, exactly
        w.write_array("avg_residual", np.array([avg], dtype=np.float32))
        w.write_array("bucket_cutoffs", cutoffs.astype(np.float32))
        w.write_array("bucket_weights", weights.astype(np.float32))
        w.write_array("codes", codes.astype(np.int32))
        w.write_array("doclens", doclens.astype(np.int32))
        w.write_array("ivf_offsets", ivf_offsets)
        w.write_array("ivf_docs", ivf_docs)
        w.commit(
            {
                "dim": int(dim),
                "nbits": int(nbits),
                "n_docs": int(doclens.shape[0]),
                "n_tokens": int(codes.shape[0]),
                "n_centroids": int(n_cent),
                "ids": "none",
                "build": {"source": "colbert-ai", "source_path": str(src.resolve())},
            }
        )
