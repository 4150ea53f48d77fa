"""A wheel built from pyproject.toml carries every package and every recipe in the tree.

The package list is explicit (``rewards/`` and ``recipes/`` install as ``refiner_rl.rewards`` and
``refiner_rl.recipes``), so a new sub-package that is not listed would import in an editable install and be missing
from a real one.
"""

import fnmatch
import os

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setuptools() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    listed = set(_setuptools()["packages"])
    found = {
        os.path.relpath(d, ROOT).replace(os.sep, ".")
        for d, _, files in os.walk(os.path.join(ROOT, "refiner_rl"))
        if "__init__.py" in files
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {"refiner_rl.rewards", "refiner_rl.recipes"} <= listed


def test_every_recipe_file_is_package_data():
    patterns = _setuptools()["package-data"]["refiner_rl.recipes"]
    recipes = os.path.join(ROOT, "recipes")
    missing = []
    for d, _, files in os.walk(recipes):
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), recipes).replace(os.sep, "/")
            if name.endswith((".py", ".pyc")) or "__pycache__" in rel:
                continue
            if not any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns):
                missing.append(rel)
    assert missing == [], "add patterns for these to [tool.setuptools.package-data] in pyproject.toml"
