"""The compiled visual-BPE core (`_core.cpp`, pybind11), found wherever this node has it.

`ray job submit --working-dir .` uploads the checkout *without git-ignored files*, and the
uploaded copy of `tessera` is first on the job's `sys.path`, so it shadows the installed
package and lacks the compiled `_core*.so` that `pip install` built. The core is therefore
looked up in order:

1. beside this file (a normal or editable install, a built checkout);
2. in the installed `tessera` distribution (site-packages, or the checkout an editable install
   points to), when the package imported is an uploaded copy;
3. compiled from the `_core.cpp` beside this file into `$TESSERA_CACHE` (default
   `~/.cache/tessera`), keyed by the source's hash, when the node has pybind11 and a C++
   compiler but no installed build (a node that only gets the working dir).

`TESSERA_BPE_CORE=source` skips 1–2 (tests use it to exercise 3).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import uuid
from types import ModuleType

MODULE = "tessera.bpe._core"
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "_core.cpp")
SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    return module


def _beside(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, f) for f in sorted(os.listdir(directory))
            if f.startswith("_core.") and f.endswith(SUFFIXES)]


def installed_builds() -> list[str]:
    """Compiled cores of the installed `tessera` distribution (other than the one beside this file)."""
    try:
        dist = importlib.metadata.distribution("tessera")
    except importlib.metadata.PackageNotFoundError:
        return []
    found = [str(dist.locate_file(f)) for f in (dist.files or [])
             if str(f).replace(os.sep, "/").startswith("tessera/bpe/_core.") and str(f).endswith(SUFFIXES)]
    direct = dist.read_text("direct_url.json")  # an editable install: the checkout it points to
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            found += _beside(os.path.join(url[len("file://"):], "tessera", "bpe"))
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in found)
            if os.path.isfile(p) and os.path.dirname(p) != HERE]


def build_from_source(cache: str | None = None) -> str:
    """Compile `_core.cpp` once per source hash and interpreter; concurrent builders race safely
    (each writes its own temporary file, then an atomic rename)."""
    import pybind11

    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = cache or os.environ.get("TESSERA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tessera")
    target = os.path.join(cache, f"bpe-core-{digest}", "_core" + importlib.machinery.EXTENSION_SUFFIXES[0])
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-O3", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", SOURCE, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ImportError(f"compiling the visual-BPE core failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def load_core() -> ModuleType:
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    tried = []
    if os.environ.get("TESSERA_BPE_CORE") != "source":
        for path in _beside(HERE) + installed_builds():
            try:
                return _load(path)
            except ImportError as e:  # built for another interpreter or platform: try the next
                tried.append(f"{path}: {e}")
    try:
        return _load(build_from_source())
    except (ImportError, OSError) as e:
        tried.append(f"build from {SOURCE}: {e}")
    raise ImportError(
        "the compiled visual-BPE core (tessera/bpe/_core.cpp) is not available on this node. Install the project "
        "on every node (`pip install -c constraints.txt .`), or give the node pybind11 and a C++ compiler so it "
        "can be built from the uploaded source. Tried:\n  " + "\n  ".join(tried))


_core = load_core()
