"""Batch encoding on Ray: a pool of encoder actors (one model each, CPU or GPU) over a corpus,
results streamed back in corpus order with bounded memory."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edgeplaid.distributed._cluster import connect


class EncoderActor:
    """One model in one Ray actor (wrapped by ``ray.remote``): :meth:`encode` returns
    ``ColBERT.encode_documents`` of a chunk of texts as numpy arrays."""

    def __init__(
        self, model: str, device: str = "cpu", threads: int | None = None, precision: str = "auto"
    ) -> None:
        import torch

        from edgeplaid.model import load_model

        if threads is not None:
            torch.set_num_threads(threads)
        self.model = load_model(model, device=device, precision=precision)

    def encode(self, texts: list[str], batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
        """tokens (n_tokens, dim) float32 and doclens (n,) int64 of ``texts``."""
        tokens, doclens = self.model.encode_documents(texts, batch_size=batch_size, show_progress_bar=False)
        return tokens.float().cpu().numpy(), doclens.cpu().numpy().astype(np.int64)


def encode(
    model: str,
    texts: Sequence[str],
    *,
    ids: Sequence[Any] | None = None,
    metadata: Sequence[dict[str, Any] | None] | None = None,
    keep_texts: bool = False,
    chunk_docs: int = 256,
    batch_size: int | None = None,
    n_actors: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
    threads: int | None = None,
    max_in_flight: int = 2,
    ray_address: str | None = None,
    actor_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Encodes ``texts`` with a pool of ``n_actors`` encoder actors, yielding dict batches
    ``{doc_tokens (n_tokens, dim) float32, doclens (n,) int64, ids, metadata, texts}`` in corpus
    order: what :meth:`edgeplaid.distributed.ShardedIndex.build` reads as a stream.

    Args:
        model: a model spec :func:`edgeplaid.model.load_model` takes (a directory visible to
            every node, a Hub id in every node's cache, or ``"minilm"``).
        texts: the documents; ids, metadata: optional, one per document, carried into the
            batches (ids default to None: the build numbers the documents).
        keep_texts: put each chunk's texts in its batch (for an index with a lexical side).
        chunk_docs: documents per actor call; batch_size: the model's own batch (its default).
        n_actors: encoder actors (default: the cluster's CPUs / threads, or its GPUs on a GPU
            device); threads: torch threads per actor (default 1 on CPU); precision: the
            encoder's (:meth:`edgeplaid.ColBERT.from_pretrained`).
        max_in_flight: chunks queued per actor: at most n_actors * max_in_flight chunks of
            vectors are held at once, whatever the corpus size.
        actor_options: ``ray.remote`` options of the encoder actors.

    The actors end when the iterator is exhausted or closed.
    """
    import ray

    texts = list(texts)
    n = len(texts)
    for name, col in (("ids", ids), ("metadata", metadata)):
        if col is not None and len(col) != n:
            raise ValueError(f"{name}: {len(col)} entries for {n} texts")
    if isinstance(chunk_docs, bool) or not isinstance(chunk_docs, int) or chunk_docs < 1:
        raise ValueError(f"chunk_docs: expected a positive int, got {chunk_docs!r}")
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight: expected a positive int, got {max_in_flight!r}")
    connect(ray_address)
    gpu = str(device).startswith("cuda")
    if threads is None:
        threads = 1 if not gpu else None
    opts: dict[str, Any] = {"num_gpus": 1} if gpu else {"num_cpus": threads or 1}
    opts.update(actor_options or {})
    if n_actors is None:
        res = ray.cluster_resources()
        n_actors = int(res.get("GPU", 1)) if gpu else max(1, int(res.get("CPU", 1) // (threads or 1)))
    chunks = [(s, min(s + chunk_docs, n)) for s in range(0, n, chunk_docs)]
    n_actors = max(1, min(int(n_actors), len(chunks) or 1))
    remote = ray.remote(EncoderActor).options(**opts)
    actors = [remote.remote(model, str(device), threads, precision) for _ in range(n_actors)]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="edgeplaid: encoding", unit="doc", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    try:
        pending: collections.deque[tuple[int, int, Any, int]] = collections.deque()
        nxt = 0

        def submit(actor: int) -> None:
            nonlocal nxt
            s, e = chunks[nxt]
            pending.append((s, e, actors[actor].encode.remote(texts[s:e], batch_size), actor))
            nxt += 1

        for i in range(min(len(chunks), n_actors * max_in_flight)):
            submit(i % n_actors)
        while pending:
            s, e, ref, actor = pending.popleft()
            tokens, doclens = ray.get(ref)
            if nxt < len(chunks):
                submit(actor)  # the actor that just answered has a free slot
            if bar is not None:
                bar.update(e - s)
            yield {
                "doc_tokens": tokens,
                "doclens": doclens,
                "ids": None if ids is None else list(ids[s:e]),
                "metadata": None if metadata is None else list(metadata[s:e]),
                "texts": texts[s:e] if keep_texts else None,
            }
    finally:
        if bar is not None:
            bar.close()
        for a in actors:
            ray.kill(a, no_restart=True)
