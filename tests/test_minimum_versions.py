"""The APIs of our dependencies that the code calls, imported and inspected on the installed versions.

In the fast loop that is today's versions; `.ci/smoke.sh PYTHON --minimum` (the oldest declared
Python in .ci/run) installs exactly the minimums setup.cfg declares and runs this file there with
FLOWERS_MINIMUM_VERSIONS=1, which also checks that the installed versions are those minimums.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re

import pytest

from conftest import REPO


def declared_minimums() -> dict[str, str]:
    """setup.cfg's install_requires: package -> the version after >=."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    found = {}
    for line in cfg["options"]["install_requires"].split("\n"):
        match = re.fullmatch(r"\s*([\w-]+)>=([\w.]+)\s*", line)
        if match:
            found[match[1].lower()] = match[2]
    return found


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "PIL": "pillow"}


def imported_names() -> list[tuple[str, str]]:
    """(module, name) of every `from <dependency> import name` in flowers/, at the top or in a function
    (lazy imports run only on some paths: they must exist too)."""
    declared = declared_minimums()
    found = set()
    for path in sorted((REPO / "flowers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top = node.module.split(".")[0]
                if DISTRIBUTIONS.get(top, top).lower() in declared:
                    found |= {(node.module, alias.name) for alias in node.names}
    return sorted(found)


# Keyword arguments we pass whose absence an import would not show (the release that added each):
KEYWORDS = [
    ("accelerate", "Accelerator.unwrap_model", "keep_torch_compile"),  # 1.3.0 (training.py)
    ("accelerate.utils", "DataLoaderConfiguration", "data_seed"),      # 1.1.0 (runtime.py)
    ("accelerate.utils", "DataLoaderConfiguration", "use_seedable_sampler"),
    ("torch.onnx", "export", "dynamo"),                                # export.py; 2.7 exports ResNet18
    ("torch.onnx", "export", "dynamic_shapes"),
    ("torch.onnx", "export", "external_data"),
    ("torchvision.models", "list_models", "module"),                   # model.py
    ("datasets", "Dataset.train_test_split", "stratify_by_column"),
]


@pytest.mark.parametrize("module, name", imported_names())
def test_every_name_we_import_from_a_dependency_exists(module, name):
    assert hasattr(importlib.import_module(module), name) or importlib.util.find_spec(f"{module}.{name}"), \
        f"from {module} import {name}: not in {module} {_version_of(module)}"


@pytest.mark.parametrize("module, attribute, keyword", KEYWORDS)
def test_the_keywords_we_pass_exist(module, attribute, keyword):
    target = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    assert keyword in inspect.signature(target).parameters, \
        f"{module}.{attribute}({keyword}=...): not in {module} {_version_of(module)}"


@pytest.mark.skipif(not os.environ.get("FLOWERS_MINIMUM_VERSIONS"), reason="the smoke run's --minimum install")
def test_the_installed_versions_are_the_declared_minimums():
    installed = {package: importlib.metadata.version(package) for package in declared_minimums()}
    wrong = {p: (v, installed[p]) for p, v in declared_minimums().items() if not _same_release(installed[p], v)}
    assert not wrong, f"declared minimum vs installed: {wrong}"


def _same_release(installed: str, declared: str) -> bool:
    """6 is 6.0.x; 2.7 is 2.7.0 (pip's == pads with zeros): the declared parts match."""
    parts = [int(p) for p in re.findall(r"\d+", installed)]
    wanted = [int(p) for p in declared.split(".")]
    return parts[:len(wanted)] == wanted and all(p == 0 for p in parts[len(wanted):3])


def _version_of(module: str) -> str:
    top = module.split(".")[0]
    return importlib.metadata.version(DISTRIBUTIONS.get(top, top))
