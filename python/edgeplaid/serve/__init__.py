"""edgeplaid as an HTTP service (FastAPI + uvicorn):
``edgeplaid serve [--model M] [--index DIR] [--device cuda]``."""

from __future__ import annotations

import argparse
import os
import sys

from edgeplaid.serve.app import EmbeddingJob, ServeConfig, create_app, service_device
from edgeplaid.serve.batcher import MicroBatcher, Overloaded
from edgeplaid.serve.server import uvicorn_config

__all__ = [
    "EmbeddingJob",
    "MicroBatcher",
    "Overloaded",
    "ServeConfig",
    "create_app",
    "serve",
    "service_device",
    "uvicorn_config",
]


# oneDNN (the encoder's linear layers on CPU) caches a primitive per input shape, in two LRU
# caches of 1,024 entries each (ideep's and oneDNN's own), about 0.3 MB an entry: a service meets
# a new number of tokens in almost every batch, so its memory grew by hundreds of MB before the
# caches filled (a soak: 649 MB -> 1,486 MB, still rising). 64 entries hold every shape of the
# last few batches; building a primitive again costs far less than the batch that needs it.
ONEDNN_CACHE_ENTRIES = "64"


def bound_memory() -> None:
    """Bounds what a long-running process keeps per batch shape: the oneDNN caches (above;
    read when oneDNN first runs, so called before the model is loaded; a value already in the
    environment wins) and glibc's malloc arenas (one per thread that ever allocated, each
    holding freed memory of its own: 2 keep the tokenizer, event-loop and batch threads from
    spreading the heap)."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)
    if sys.platform.startswith("linux") and "MALLOC_ARENA_MAX" not in os.environ:
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
        except (OSError, AttributeError):  # not glibc
            pass


def serve(args: argparse.Namespace) -> None:
    """Loads the model (and index) on ``args.device``, then serves until SIGTERM/SIGINT;
    in-flight requests are answered before the process exits (uvicorn's graceful shutdown).
    Without ``args.model`` only ``/v1/rerank``'s embedding form is served."""
    import uvicorn

    from edgeplaid.model import load_model

    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    bound_memory()
    device = getattr(args, "device", "cpu")
    precision = getattr(args, "precision", "auto")
    model = load_model(args.model, device=device, log=log, precision=precision) if args.model else None
    index = None
    if args.index:
        from edgeplaid.distributed._layout import is_sharded
        from edgeplaid.index import Index

        if is_sharded(args.index):  # one Ray actor per shard (edgeplaid.distributed)
            from edgeplaid.distributed import ShardedIndex

            index = ShardedIndex.load(
                args.index, device=device, ray_address=getattr(args, "ray_address", None)
            )
        else:
            index = Index.load(args.index, device=device)
    config = ServeConfig(
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_documents=args.max_documents,
        max_text_chars=args.max_text_chars,
        max_request_chars=getattr(args, "max_request_chars", ServeConfig.max_request_chars),
        request_timeout_s=getattr(args, "request_timeout", ServeConfig.request_timeout_s),
        max_write_queue=getattr(args, "max_write_queue", ServeConfig.max_write_queue),
        api_key=args.api_key or None,
    )
    app = create_app(model, index, config, device=device)
    uvicorn.Server(
        uvicorn_config(
            app,
            args.host,
            args.port,
            log_level="warning" if args.quiet else "info",
            timeout_graceful_shutdown=30,
        )
    ).run()
