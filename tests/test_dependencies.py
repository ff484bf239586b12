"""The supported versions agree: each runtime dependency in pyproject.toml, and each of its extras' (`train`,
`adapt`), has a lower bound, which requirements-min.txt pins exactly (the oldest stack, `make test-min`),
requirements.txt pins at or above it (the development stack), and the environment running these tests has nothing
older."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _bounds() -> dict[str, Version]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"] + [text for extra in project["optional-dependencies"].values()
                                              for text in extra]
    bounds = {}
    for text in dependencies:
        requirement = Requirement(text)
        lower = [spec for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{text}: one '>=' lower bound, tested by requirements-min.txt"
        bounds[canonicalize_name(requirement.name)] = Version(lower[0].version)
    return bounds


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{name}: {line} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_requirements_min_pins_exactly_the_lower_bounds():
    assert _pins("requirements-min.txt") == _bounds()


def test_requirements_pins_every_dependency_within_its_range():
    pins = _pins("requirements.txt")
    for name, bound in _bounds().items():
        assert name in pins and pins[name] >= bound, f"requirements.txt: {name} {pins.get(name)} < {bound}"


def test_installed_versions_are_within_the_supported_ranges():
    for name, bound in _bounds().items():
        installed = Version(metadata.version(name))
        assert Version(installed.base_version) >= bound, f"{name} {installed} is older than the supported {bound}"
