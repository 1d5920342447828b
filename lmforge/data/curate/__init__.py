"""`lmforge curate`: raw text -> curated shards + a report of what every step removed, on datatrove.

`run(CurateConfig)` is the whole stage; `configs/curate.yaml` is the recipe to copy.
"""

from lmforge.data.curate.config import CurateConfig
from lmforge.data.curate.pipeline import CurateResult, run

__all__ = ["CurateConfig", "CurateResult", "run"]
