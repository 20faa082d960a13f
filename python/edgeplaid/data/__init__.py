"""Sample data shipped with edgeplaid: the Cranfield collection (1,400 aeronautics abstracts,
225 queries with relevance judgements), in BEIR format. See cranfield/SOURCE.md."""

from __future__ import annotations

from pathlib import Path

CRANFIELD = Path(__file__).parent / "cranfield"
