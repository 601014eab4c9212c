"""Which packages the distribution holds; everything else about it is in pyproject.toml.

The shipped models live in models/ at the top of the checkout and install as the package data of
``rapnet.models``, so a non-editable install (``pip install .``) carries them; rapnet.shipped finds them in
either place. pyproject.toml cannot map a folder outside the package tree into a package found by
``packages.find``, hence this file.
"""
from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["rapnet*", "edge*", "cloud*", "orchestration*", "protos*"]),
              "rapnet.models"],
    package_dir={"rapnet.models": "models"},
)
