"""The compiled BPE core loads from an uploaded working dir that lacks it (`ray job submit --working-dir .`
skips git-ignored files such as `_core*.so`): from the installed build, or built from the shipped source."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# fit (Table, Shard), encode (Encoder) and decode a grid with whichever core was loaded
CHECK = """
import numpy as np, tessera, tessera.bpe.core as core
from tessera.bpe.model import VisualBPE
grids = [np.random.default_rng(i).integers(0, 4, size=(6, 6)) for i in range(8)]
bpe = VisualBPE.fit(grids, codebook_size=4, num_merges=6)
tokens = bpe.encode(grids[0])
assert len(bpe.merges) == 6 and len(tokens) < 36 and (bpe.decode(tokens, (6, 6)) == grids[0]).all()
print(tessera.__file__)
print(core._core.__file__)
"""


def uploaded_copy(tmp_path):
    """What Ray uploads for `--working-dir .`: the tracked files, no build outputs."""
    files = subprocess.run(["git", "ls-files", "tessera"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert "tessera/bpe/_core.cpp" in files and not any(f.endswith(".so") for f in files)
    for f in files:
        os.makedirs(tmp_path / os.path.dirname(f), exist_ok=True)
        shutil.copy(os.path.join(REPO, f), tmp_path / f)
    return tmp_path


def run_in(directory, env_extra):
    """Import tessera the way a job does from its working dir (the cwd first on sys.path) and use the core."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env_extra
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=directory, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_an_uploaded_working_dir_uses_the_installed_core(tmp_path):
    copy = uploaded_copy(tmp_path / "wd")
    package, core_file = run_in(copy, {})
    assert package.startswith(str(copy)), "the uploaded copy shadows the installed package, as under Ray"
    assert not core_file.startswith(str(copy)) and os.path.isfile(core_file)


def test_a_node_without_an_installed_build_compiles_the_shipped_source(tmp_path):
    pytest.importorskip("pybind11")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    copy = uploaded_copy(tmp_path / "wd")
    cache = tmp_path / "cache"
    package, core_file = run_in(copy, {"TESSERA_BPE_CORE": "source", "TESSERA_CACHE": str(cache)})
    assert package.startswith(str(copy)) and core_file.startswith(str(cache))
    assert run_in(copy, {"TESSERA_BPE_CORE": "source", "TESSERA_CACHE": str(cache)})[1] == core_file, "built once, then reused"
