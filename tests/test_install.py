"""A source checkout without the built extension, found before the installed package.

After `pip install .`, `python -m tritter_comm ...` or `python -c "import tritter_comm"` run from
the repository root import the source tree's tritter_comm (the current directory comes first on
sys.path), which has no `_native` extension. Python's own message blamed a circular import; the
codec's `_native` import (the package's first) says what happened and what to do (issue 15). The
wheel itself is installed and run from a fresh virtual environment by .ci/run.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tritter_comm
from _procs import ROOT

INSTALLED = Path(tritter_comm.__file__).resolve().parent  # the copy these tests import


@pytest.fixture
def checkout(tmp_path):
    """A directory holding a copy of tritter_comm/'s sources, without any built extension."""
    shutil.copytree(ROOT / "tritter_comm", tmp_path / "tritter_comm",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    return tmp_path.resolve()  # the path the child sees as its current directory


def _run(args, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args", [["-c", "import tritter_comm"], ["-m", "tritter_comm", "info"]],
                         ids=["import", "python -m"])
def test_source_tree_without_extension_says_what_to_do(checkout, args):
    # the installed copy next on sys.path, as after `pip install .`
    p = _run(args, checkout, pythonpath=INSTALLED.parent)
    assert p.returncode == 1
    err = p.stderr
    assert "circular import" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ImportError: tritter_comm was imported from the source tree at "
                           f"{checkout / 'tritter_comm'}, which has no built Rust extension"), err
    assert f"It shadows the installed package at {INSTALLED}." in last, err
    assert "Run from another directory" in last and "`pip install -e .`" in last, err
    assert "`maturin develop`" in last, err


def test_source_tree_without_extension_and_nothing_installed(checkout):
    p = _run(["-S", "-c", "import tritter_comm"], checkout)  # -S: no site-packages
    err = p.stderr
    last = err.strip().splitlines()[-1]
    assert last.startswith("ImportError: tritter_comm was imported from the source tree at "
                           f"{checkout / 'tritter_comm'}, which has no built Rust extension"), err
    assert "No installed tritter_comm was found elsewhere on sys.path" in last, err
    assert "`pip install -e .` or `maturin develop`" in last, err


def test_an_extension_that_does_not_load_keeps_its_own_error(checkout):
    (checkout / "tritter_comm" / "_native.abi3.so").write_bytes(b"not a shared library")
    p = _run(["-c", "import tritter_comm"], checkout, pythonpath=INSTALLED.parent)
    assert p.returncode == 1
    assert "source tree" not in p.stderr and "_native.abi3.so" in p.stderr, p.stderr
