"""Index.import_colbert on a tiny PLAID index in colbert-ai's on-disk layout.

With colbert-ai installed (the ``colbert`` test extra; pure Python with ``--no-deps`` + gitpython,
ujson) every file is written by colbert-ai's own code: ``ResidualCodec`` (bucket cutoffs and
weights from our quantiles, ``compress`` -> ``binarize``, ``save``), ``ResidualEmbeddings.save``,
``optimize_ivf`` -> ivf.pid.pt, plus the JSON files exactly as ``IndexSaver`` / ``CollectionIndexer``
write them; the imported index must decompress to what colbert-ai's ``ResidualCodec.decompress``
returns. colbert-ai's full ``Indexer`` is not run: it needs faiss for k-means and a BERT
checkpoint to encode text, and its encoder is not what is under test. Without colbert-ai the
same files are written by a transcription of colbert-ai's ``binarize`` (np.packbits) and torch.save.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _plaid_data import corpus, queries
from edgeplaid import Index
from edgeplaid.index import ColbertImportError
from edgeplaid.index._codec import assign, fit_buckets, kmeans
from edgeplaid.ops import reference

NBITS = 2
N_CENT = 32


def _colbert():
    try:
        from colbert.indexing.codecs.residual import ResidualCodec
        from colbert.indexing.utils import optimize_ivf
        from colbert.infra.config import ColBERTConfig
    except Exception:
        return None
    return ResidualCodec, optimize_ivf, ColBERTConfig


def _binarize(residuals: torch.Tensor, cutoffs: torch.Tensor, nbits: int) -> torch.Tensor:
    """colbert-ai ResidualCodec.binarize (CPU path), transcribed."""
    b = torch.bucketize(residuals.float(), cutoffs).to(torch.uint8)
    b = b.unsqueeze(-1).expand(*b.size(), nbits) >> torch.arange(nbits, dtype=torch.uint8)
    packed = np.packbits(np.asarray((b & 1).contiguous().flatten()))
    return torch.as_tensor(packed, dtype=torch.uint8).reshape(residuals.size(0), -1)


def write_colbert_index(root: Path, tokens: torch.Tensor, doclens: torch.Tensor, chunks: int = 2):
    """A colbert-ai PLAID index of tokens (n, dim) / doclens (nd,); returns (codec or None, centroids)."""
    root.mkdir()
    dim = tokens.shape[1]
    x = tokens.numpy()
    centroids = torch.from_numpy(kmeans(x, N_CENT, 3)).half()  # colbert-ai stores fp16 centroids
    c32 = centroids.float().numpy()
    avg, cutoffs, weights = fit_buckets(x - c32[assign(x, c32)], NBITS)
    cutoffs, weights = torch.from_numpy(cutoffs), torch.from_numpy(weights)
    cb = _colbert()
    codec = None
    if cb is not None:
        ResidualCodec, _optimize_ivf, ColBERTConfig = cb
        config = ColBERTConfig(dim=dim, nbits=NBITS, index_path=str(root))
        codec = ResidualCodec(config, centroids, torch.tensor(avg), cutoffs, weights)
        codec.save(index_path=str(root))
    else:
        torch.save(centroids, root / "centroids.pt")
        torch.save(torch.tensor([avg]), root / "avg_residual.pt")
        torch.save((cutoffs, weights), root / "buckets.pt")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), doclens.cumsum(0)])
    bounds = np.linspace(0, doclens.shape[0], chunks + 1).astype(int)
    all_codes = []
    for c in range(chunks):
        a, b = int(bounds[c]), int(bounds[c + 1])
        embs = tokens[offsets[a] : offsets[b]].half().float()  # colbert-ai compresses fp16 embeddings
        if codec is not None:
            comp = codec.compress(embs)
            comp.save(str(root / str(c)))
            codes = comp.codes
        else:
            codes = (centroids.float() @ embs.T).max(dim=0).indices
            torch.save(codes, root / f"{c}.codes.pt")
            torch.save(_binarize(embs - centroids.float()[codes], cutoffs, NBITS), root / f"{c}.residuals.pt")
        all_codes.append(codes)
        (root / f"doclens.{c}.json").write_text(json.dumps(doclens[a:b].tolist()))
        meta = {
            "passage_offset": a,
            "num_passages": b - a,
            "num_embeddings": int(codes.shape[0]),
            "embedding_offset": int(offsets[a]),
        }
        (root / f"{c}.metadata.json").write_text(json.dumps(meta))
    config_json = {"dim": dim, "nbits": NBITS, "doc_maxlen": 180, "checkpoint": "tiny"}
    meta = {
        "config": config_json,
        "num_chunks": chunks,
        "num_partitions": N_CENT,
        "num_embeddings": int(tokens.shape[0]),
        "avg_doclen": float(doclens.float().mean()),
    }
    (root / "metadata.json").write_text(json.dumps(meta))
    (root / "plan.json").write_text(
        json.dumps({k: meta[k] for k in ("config", "num_chunks", "num_partitions")})
    )
    codes = torch.cat(all_codes)
    srt = codes.sort()
    lengths = torch.bincount(srt.values, minlength=N_CENT)
    if cb is not None:
        cb[1](srt.indices, lengths, str(root), verbose=0)  # optimize_ivf writes ivf.pid.pt
    else:
        emb2pid = torch.repeat_interleave(torch.arange(doclens.shape[0]), doclens)
        pids = emb2pid[srt.indices]
        lists = [torch.unique(p) for p in pids.split(lengths.tolist())]
        ivf = torch.cat([*lists, torch.zeros(max(len(x) for x in lists), dtype=torch.long)])
        torch.save((ivf, torch.tensor([len(x) for x in lists])), root / "ivf.pid.pt")
    return codec, centroids


@pytest.fixture(scope="module")
def colbert_index(tmp_path_factory):
    tokens, doclens, topics = corpus(n_docs=120, dim=32, seed=3)
    root = tmp_path_factory.mktemp("colbert") / "src"
    codec, _centroids = write_colbert_index(root, tokens, doclens)
    return root, codec, tokens, doclens, topics


def test_import_decompresses_like_colbert(colbert_index, tmp_path):
    root, codec, tokens, doclens, _ = colbert_index
    idx = Index.import_colbert(root, tmp_path / "ours")
    assert (idx.n_docs, idx.n_tokens, idx.dim, idx.nbits, idx.n_centroids) == (
        doclens.shape[0],
        tokens.shape[0],
        32,
        NBITS,
        N_CENT,
    )
    assert torch.equal(idx.doclens.long(), doclens)
    ours = reference.decompress_residuals(
        idx.codes, idx.residuals, idx.centroids.float(), idx.bucket_weights, NBITS
    )
    if codec is not None:
        codes = torch.cat([torch.load(root / f"{c}.codes.pt") for c in range(2)])
        res = torch.cat([torch.load(root / f"{c}.residuals.pt") for c in range(2)])
        theirs = codec.decompress(codec.Embeddings(codes, res)).float()
        assert torch.allclose(ours, theirs, atol=1e-6)
    # either way: close to the fp16 originals colbert-ai compressed
    assert float((ours * tokens).sum(-1).mean()) > 0.9


def test_imported_search_equals_exhaustive(colbert_index, tmp_path):
    root, _, _, _, topics = colbert_index
    idx = Index.import_colbert(root, tmp_path / "ours")
    q, m = queries(topics, n=8, length=6)
    exact = idx.search_exhaustive(q, k=5, queries_mask=m)
    got = idx.search(
        q,
        k=5,
        queries_mask=m,
        n_probe=N_CENT,
        threshold=None,
        n_candidates=500,
        n_rerank=500,
        precision="exact",
    )
    assert torch.equal(got.ids, exact.ids)
    assert torch.allclose(got.scores, exact.scores)


def test_colbert_ai_is_used_when_installed():
    if _colbert() is None:
        pytest.skip("colbert-ai is not importable here: the index files were written by a transcription")


def test_not_a_colbert_index(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ColbertImportError, match=r"metadata\.json"):
        Index.import_colbert(tmp_path / "x", tmp_path / "y")
    assert not (tmp_path / "y").exists()
