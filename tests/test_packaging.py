"""A non-editable install carries what zoo needs: the configs (inside the zoo package) and the CUDA sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("zoo", "kernels", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (so that no build/ or egg-info lands in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (found,) = (tmp / "dist").glob("hybrid_zoo-*.whl")
    return found


def test_the_wheel_carries_every_config_inside_the_package_and_the_cuda_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"zoo/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert "zoo/configs/models/jamba-tiny.yaml" in configs  # zoo demo's default
    assert configs <= names, sorted(configs - names)
    demo = yaml.safe_load((ROOT / "configs" / "compare" / "demo.yaml").read_text())
    for spec in demo["models"].values():  # the models zoo compare demo names
        path = spec["config"] if isinstance(spec, dict) else spec
        assert f"zoo/{path}" in names
    sources = {f"zoo_kernels/{p.relative_to(ROOT / 'kernels' / 'zoo_kernels').as_posix()}"
               for p in (ROOT / "kernels" / "zoo_kernels").rglob("csrc/*") if p.is_file()}
    assert len(sources) >= 20 and sources <= names, sorted(sources - names)
    assert not any(n.startswith(("configs/", "tests/", "benchmarks/", "scripts/")) for n in names)
