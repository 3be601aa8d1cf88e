"""Import the package as it was at another git revision, to time a change against its parent in the same run."""
from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_baseline(rev: str):
    """The package ``sat_kernels`` at git revision ``rev`` (``git archive``), imported as ``sat_kernels_base``.

    Its modules import each other relatively, so the copy runs its own code throughout; on a CPU machine no backend
    registers a custom op, so the two copies do not collide."""
    root = Path(tempfile.mkdtemp(prefix="sat_kernels_base_"))
    archive = subprocess.run(["git", "archive", rev, "sat_kernels"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "sat_kernels").rename(root / "sat_kernels_base")
    sys.path.insert(0, str(root))
    return importlib.import_module("sat_kernels_base")
