"""The ColBERT encoder: checkpoint loading (PyLate, Stanford and plain layouts), PyLate's
tokenisation rules, and fast batched encoding into padded queries and packed documents."""

from edgeplaid.model._checkpoint import NotAModelError
from edgeplaid.model.colbert import ColBERT
from edgeplaid.model.load import load_model

__all__ = ["ColBERT", "NotAModelError", "load_model"]
