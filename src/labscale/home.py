"""labscale's home folder: converted embedded models, the fingerprint cache, and other per-user state.

`$LABSCALE_HOME` if set, else the platform's user cache folder (e.g. ~/.cache/labscale). Created on demand.
"""

from __future__ import annotations

import os
from pathlib import Path


def labscale_home() -> Path:
    env = os.environ.get("LABSCALE_HOME")
    if env:
        home = Path(env).expanduser()
    else:
        import platformdirs

        home = Path(platformdirs.user_cache_dir("labscale"))
    home.mkdir(parents=True, exist_ok=True)
    return home
