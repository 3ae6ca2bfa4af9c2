"""The repository root is the package `medplib`; its folders install as `medplib.<folder>`.

setuptools cannot express "root folder = package" in pyproject.toml alone while also discovering
sub-packages, so the package list is derived here. Tests and examples are not packages (no
`__init__.py`) and stay out of the wheel.
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Modules of the root folder that build the project and are no part of the package: shipped as
# `medplib.setup`, importing it would run setuptools.
BUILD_ONLY_MODULES = {"setup"}


class BuildPackageOnly(build_py):
    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "medplib" and m[1] in BUILD_ONLY_MODULES)]


subpackages = find_packages(where=".", exclude=["build*", "benchmarks*", "examples*", "tests*"])
setup(
    packages=["medplib", *(f"medplib.{name}" for name in subpackages)],
    package_dir={"medplib": "."},
    cmdclass={"build_py": BuildPackageOnly},
)
