"""Fault injection for tests: `TESSERA_FAULT=<point>` makes the process die at that point.

Jobs call `fault_point("prepare:after_samples")` at the places where a crash is most
damaging (after some outputs are written, before they are committed). The process
exits with `os._exit`, like a killed driver: no cleanup handlers, no flushing.
"""

import os

FAULT_EXIT_CODE = 86


def fault_point(name: str) -> None:
    if os.environ.get("TESSERA_FAULT") == name:
        print(f"[tessera] injected fault at {name}: exiting", flush=True)
        os._exit(FAULT_EXIT_CODE)


def fault_when(name: str, condition, poll_s: float = 0.05) -> None:
    """If `TESSERA_FAULT` names this point, die as soon as `condition()` is true, from a
    background thread, so the crash lands in the middle of whatever the job is doing."""
    if os.environ.get("TESSERA_FAULT") != name:
        return
    import threading
    import time

    def watch():
        while not condition():
            time.sleep(poll_s)
        fault_point(name)

    threading.Thread(target=watch, daemon=True).start()
