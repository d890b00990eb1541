"""Build step: the wheel carries the suite's data (conformance/resources.py says why).

matrix.yaml and fixtures/ stay at the repository's top level; building copies them
into the package as conformance/data/, with no symlink in the tree.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = ("matrix.yaml", "fixtures/probes", "fixtures/jobs", "fixtures/worker-image")


class BuildWithSuiteData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        target = Path(self.build_lib) / "conformance" / "data"
        for name in DATA:
            source, dest = Path(name), target / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(
                    source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(source, dest)


setup(cmdclass={"build_py": BuildWithSuiteData})
