"""`labscale serve` with a test-controlled pause in decoding: `python tests/serve_held.py HOLD_FILE serve ARGS…`.

While HOLD_FILE exists, every batch pauses once it has taken AFTER cancel-hook polls (the batch check and the
first decode steps: tokens have been generated and streamed) and writes HOLD_FILE + ".reached"; it goes on when
the file is removed, or stops when the server cancels it (the pause polls the real `should_stop` hook). Tests can
so SIGTERM the real server while requests are provably mid-decode, without relying on how long anything takes.
"""

from __future__ import annotations

import os
import sys
import time

from labscale.models.hf.backend import HFBackend

AFTER = 4

hold = sys.argv[1]
original = HFBackend.generate


def generate(self, requests, progress=None, on_token=None, should_stop=None, admit=None, on_result=None):
    polls = [0]

    def held() -> bool:
        stop = should_stop is not None and should_stop()
        polls[0] += 1
        if polls[0] > AFTER and os.path.exists(hold) and not stop:
            with open(hold + ".reached", "w"):
                pass
            while os.path.exists(hold) and not (stop := should_stop is not None and should_stop()):
                time.sleep(0.01)
        return stop

    return original(self, requests, progress, on_token, held, admit, on_result)  # continuous batching as served


HFBackend.generate = generate

if __name__ == "__main__":
    from labscale.cli import main

    sys.argv = ["labscale", *sys.argv[2:]]
    main()
