"""Rebuild the shipped moderation and safety-SFT data from the templates (deterministic).

    python scripts/build_moderation_set.py

Reads lmforge/data/moderation/templates/*.yaml (written for lmforge, Apache-2.0) and writes
lmforge/data/moderation/{moderation_train,moderation_validation,moderation_test,safety_sft,
refusal_judge}.jsonl.gz and manifest.json; see lmforge/safety/moderation_data.py and
lmforge/data/moderation/MODERATION.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.safety.moderation_data import OUT, build  # noqa: E402

if __name__ == "__main__":
    manifest = build()
    print(json.dumps({"out": str(OUT), "records": manifest["records"], "dropped": manifest["dropped"]}, indent=1))
