"""edgeplaid as an HTTP service (FastAPI + uvicorn):
``edgeplaid serve [--model M] [--index DIR] [--device cuda]``."""

from __future__ import annotations

import argparse
import sys

from edgeplaid.serve.app import EmbeddingJob, ServeConfig, create_app, service_device
from edgeplaid.serve.batcher import MicroBatcher, Overloaded

__all__ = [
    "EmbeddingJob",
    "MicroBatcher",
    "Overloaded",
    "ServeConfig",
    "create_app",
    "serve",
    "service_device",
]


def serve(args: argparse.Namespace) -> None:
    """Loads the model (and index) on ``args.device``, then serves until SIGTERM/SIGINT;
    in-flight requests are answered before the process exits (uvicorn's graceful shutdown).
    Without ``args.model`` only ``/v1/rerank``'s embedding form is served."""
    import uvicorn

    from edgeplaid.model import load_model

    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    device = getattr(args, "device", "cpu")
    model = load_model(args.model, device=device, log=log) if args.model else None
    index = None
    if args.index:
        from edgeplaid.index import Index

        index = Index.load(args.index, device=device)
    config = ServeConfig(
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_documents=args.max_documents,
        max_text_chars=args.max_text_chars,
        api_key=args.api_key or None,
    )
    uvicorn.run(
        create_app(model, index, config, device=device),
        host=args.host,
        port=args.port,
        log_level="warning" if args.quiet else "info",
        timeout_graceful_shutdown=30,
    )
