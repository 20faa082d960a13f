"""PLAID search pipeline (stages 1-4 over edgeplaid's kernels) and exhaustive MaxSim search."""

from edgeplaid.search._plaid import (
    STAGE_TIMES,
    PlaidSearcher,
    SearchParams,
    StageTimes,
    default_params,
    resolve_params,
)

__all__ = ["STAGE_TIMES", "PlaidSearcher", "SearchParams", "StageTimes", "default_params", "resolve_params"]
