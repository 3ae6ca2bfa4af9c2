"""The repository root is the package `medplib`; its folders install as `medplib.<folder>`.

setuptools cannot express "root folder = package" in pyproject.toml alone while also discovering
sub-packages, so the package list is derived here. Tests and examples are not packages (no
`__init__.py`) and stay out of the wheel.
"""

from setuptools import find_packages, setup

subpackages = find_packages(where=".", exclude=["build*", "benchmarks*", "examples*", "tests*"])
setup(
    packages=["medplib", *(f"medplib.{name}" for name in subpackages)],
    package_dir={"medplib": "."},
)
