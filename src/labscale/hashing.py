"""Content hashes that identify results: run ids, adapter identities, cache keys.

`sha(obj)` is the sha256 of `obj` as canonical JSON (sorted keys; anything JSON cannot encode by `str`), in hex.
Every identity in labscale is built from it, so the same inputs give the same id on every machine.
"""

from __future__ import annotations

import hashlib
import json


def sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
