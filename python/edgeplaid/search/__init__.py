"""PLAID search pipeline (stages 1-4 over edgeplaid's kernels) and exhaustive MaxSim search."""

from edgeplaid.search._plaid import PlaidSearcher, SearchParams, default_params, resolve_params

__all__ = ["PlaidSearcher", "SearchParams", "default_params", "resolve_params"]
