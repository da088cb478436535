"""Packaging hook: the wheel carries the repository's configs/ inside the zoo package, as zoo/configs/.

configs/ stays at the repository root, where the README, the tests and the recipes' own header lines name it; a
package-data glob cannot reach it from zoo/ (the `zoo = ["configs/**/*.yaml"]` that pyproject.toml had matched
nothing), so build_py copies it. zoo.config_files finds the copy in an installed wheel, and the checkout's configs/
in an editable install.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's configs/ in place
            return
        files = sorted(CONFIGS.rglob("*.yaml"))
        if not files:  # an sdist made without MANIFEST.in's configs line: a wheel without configs would install
            raise RuntimeError(f"no YAML configs under {CONFIGS}: the zoo package needs them (zoo demo's model, ...)")
        target = Path(self.build_lib) / "zoo" / "configs"
        shutil.rmtree(target, ignore_errors=True)  # a config deleted since an earlier build must not ship
        for src in files:
            dst = target / src.relative_to(CONFIGS)
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst))


setup(cmdclass={"build_py": BuildPyWithConfigs})
