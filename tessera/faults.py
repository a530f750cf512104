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
