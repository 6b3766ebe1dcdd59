"""Check that requirements-gpu.txt's vLLM pin agrees with this project's requirements (and the installed packages).

vLLM pins torch exactly and bounds transformers, while this project needs ``transformers>=5`` (vLLM releases
before 0.19.1 require ``transformers<5``). This script compares, package by package, what the pinned vLLM release
declares (its wheel's ``Requires-Dist`` and ``Requires-Python``) with what ``requirements.txt`` +
``requirements-gpu.txt`` ask for, and reports every package for which no version satisfies both.

Where vLLM's declaration comes from, first match wins:

* ``--vllm_metadata FILE``: a ``METADATA`` file (e.g. from a downloaded wheel);
* ``--pypi``: the pinned release's wheel on PyPI (manylinux x86_64: ``.metadata`` file when the index offers one,
  else a few HTTP range requests into the wheel; no multi-GB download); the candidate versions are then PyPI's
  real releases, so "some version satisfies both" means a released one;
* the installed ``vllm`` (``importlib.metadata``; offline);
* the declaration recorded below for the pinned release (offline, no vLLM needed).

With vLLM installed the installed versions are checked as well: each of our requirements, each overlapping vLLM
requirement, the vLLM version against the pin, and that torch is not a CPU build (``+cpu``). Exit status: 0 all
consistent, 1 a conflict, 2 nothing to check against (no pin, or an unknown release offline; use ``--pypi``).

Only vLLM's direct requirements on packages we also name are compared; the whole tree (every transitive
dependency) is pip's job: ``pip install --dry-run --ignore-installed -r requirements-gpu.txt -r
requirements-dev.txt`` resolves it without installing anything (how requirements-gpu.txt's pins were checked).

Example:
    python scripts/check_gpu_requirements.py            # offline: files (+ the installed packages, if vLLM is)
    python scripts/check_gpu_requirements.py --pypi     # the pinned release's metadata from PyPI
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import re
import sys
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ("requirements.txt", "requirements-gpu.txt")
PYPI_SIMPLE = "https://pypi.org/simple/{name}/"
PYPI_JSON = "https://pypi.org/pypi/{name}/{version}/json"

# Requires-Python and the Requires-Dist lines naming a package of requirements*.txt, copied from the wheels'
# METADATA (vllm-<version>-cp38-abi3-manylinux_2_28_x86_64.whl, read from PyPI with --pypi on 2026-12-07).
RECORDED_RELEASES: dict[str, dict[str, object]] = {
    "0.32.0": {
        "requires_python": "<3.15,>=3.11",
        "requires_dist": [
            "sentencepiece", "numpy", "tqdm", "transformers<5.20.0,>=5.16.1", "huggingface_hub>=1.31.0",
            "tokenizers>=0.23.2", "safetensors>=0.6.2", "numba==0.65.0", "torch==2.13.0",
            'scipy; extra == "bench"', 'scipy; extra == "audio"',
        ],
    },
}


@dataclass
class Declaration:
    """What a vLLM release declares: its version, ``Requires-Python`` and ``Requires-Dist`` lines, and where from."""

    version: str
    requires_dist: list[str]
    requires_python: str | None = None
    source: str = ""


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- requirement files -------------------------------------------------------------------------------------------


def read_requirement_files(paths: Iterable[str | Path]) -> list[tuple[Requirement, str]]:
    """``(requirement, "file:line")`` for every requirement line, following ``-r`` includes (each file once)."""
    seen: set[Path] = set()
    found: list[tuple[Requirement, str]] = []

    def read(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            include = re.match(r"^(-r|--requirement)\s*=?\s*(\S+)$", line)
            if include:
                read(path.parent / include.group(2))
            elif not line.startswith("-"):
                found.append((Requirement(line), f"{path.name}:{number}"))

    for path in paths:
        read(Path(path))
    return found


def combined_specifiers(requirements: Iterable[tuple[Requirement, str]],
                        env: Mapping[str, str]) -> dict[str, tuple[SpecifierSet, list[str]]]:
    """Per canonical name: the intersection of our specifiers (markers evaluated in ``env``) and their sources."""
    combined: dict[str, tuple[SpecifierSet, list[str]]] = {}
    for requirement, source in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate(dict(env)):
            continue
        name = canonicalize_name(requirement.name)
        spec, sources = combined.get(name, (SpecifierSet(), []))
        combined[name] = (spec & requirement.specifier, [*sources, f"{requirement} ({source})"])
    return combined


def pinned_version(spec: SpecifierSet) -> str | None:
    """The version of an exact ``==X`` pin (no wildcard) in ``spec``, else None."""
    for item in spec:
        if item.operator in ("==", "===") and not item.version.endswith(".*"):
            return item.version
    return None


# --- the consistency check (pure, tested with fabricated metadata) ------------------------------------------------


def target_environment(python: str | None = None) -> dict[str, str]:
    """Marker environment of the GPU machine: Linux x86_64 and ``python`` (default: this interpreter)."""
    env = dict(default_environment())
    env.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
    if python:
        parts = python.split(".")
        env["python_version"] = ".".join(parts[:2])
        env["python_full_version"] = python if len(parts) > 2 else f"{python}.0"
    return env


def declared_requirements(declaration: Declaration, env: Mapping[str, str]) -> dict[str, Requirement]:
    """vLLM's requirements that apply in ``env`` without extras, by canonical name."""
    env = {**env, "extra": ""}
    declared = {}
    for line in declaration.requires_dist:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(env):
            name = canonicalize_name(requirement.name)
            if name in declared:  # the same package twice (e.g. numpy and numpy<2.5): both apply
                requirement = Requirement(f"{requirement.name}{declared[name].specifier & requirement.specifier}")
            declared[name] = requirement
    return declared


def _bump(version: Version) -> Version:
    """A version just above ``version`` that no ``!=`` / ``.*`` bound of a boundary catches (for open intervals)."""
    return Version(".".join(str(p) for p in (*version.release, 0, 0, 1)))


def candidate_versions(*specs: SpecifierSet, extra: Iterable[str] = ()) -> list[Version]:
    """Versions that decide whether the specifiers intersect: each boundary, a point just above it, and ``extra``."""
    candidates = set()
    for raw in (*extra, *(item.version.removesuffix(".*") for spec in specs for item in spec)):
        try:
            version = Version(raw)
        except InvalidVersion:
            continue
        candidates.update({version, _bump(version)})
    return sorted(candidates)


def common_versions(ours: SpecifierSet, theirs: SpecifierSet, candidates: Sequence[Version],
                    prereleases: bool = True) -> list[Version]:
    """The candidates that satisfy both specifier sets."""
    return [v for v in candidates if ours.contains(v, prereleases=prereleases)
            and theirs.contains(v, prereleases=prereleases)]


def check_declaration(requirements: Sequence[tuple[Requirement, str]], declaration: Declaration, *,
                      env: Mapping[str, str], released: Mapping[str, Sequence[str]] | None = None,
                      installed: Mapping[str, str] | None = None, compare_pin: bool = True) -> Report:
    """Compare our requirements with a vLLM release's declaration (and, given, the installed versions).

    Args:
        requirements: ours (:func:`read_requirement_files`).
        declaration: the vLLM release's ``Requires-Dist`` / ``Requires-Python``.
        env: marker environment (:func:`target_environment`).
        released: per canonical name, the released versions (``--pypi``); without it the candidates are the
            specifiers' boundaries, so "consistent" means "the ranges intersect".
        installed: per canonical name, the installed version; every overlapping requirement is checked on it.
        compare_pin: require our ``vllm==X`` pin to be ``declaration.version`` (False: a release considered
            as a replacement, ``--vllm_version``).
    """
    report = Report()
    ours = combined_specifiers(requirements, env)
    vllm_spec, vllm_sources = ours.get("vllm", (SpecifierSet(), []))
    pin = pinned_version(vllm_spec)
    if pin is None:
        report.problems.append(
            f"vllm is not pinned to one release ({', '.join(vllm_sources) or 'no vllm line'}): every vLLM release "
            "pins torch exactly and releases before 0.19.1 need transformers<5, so a range lets pip pick any of "
            "them or replace torch; pin vllm==X")
    elif compare_pin and Version(pin) != Version(declaration.version):
        report.problems.append(f"the metadata checked is vllm {declaration.version}, but the pin is vllm=={pin}")
    python = env.get("python_full_version", "")
    if declaration.requires_python and not SpecifierSet(declaration.requires_python).contains(python, True):
        report.problems.append(f"vllm {declaration.version} needs Python {declaration.requires_python}; "
                               f"the target is Python {python}")
    for name, requirement in sorted(declared_requirements(declaration, env).items()):
        if name not in ours:
            continue
        our_spec, sources = ours[name]
        if released is not None and name in released:
            candidates = sorted({Version(v) for v in released[name]})
            both = common_versions(our_spec, requirement.specifier, candidates, prereleases=False)
            kind = "released version"
        else:
            candidates = candidate_versions(our_spec, requirement.specifier, extra=[(installed or {}).get(name, "")])
            both = common_versions(our_spec, requirement.specifier, candidates)
            kind = "version"
        ours_text = "; ".join(sources)
        if not both:
            hint = ""
            if name == "transformers":
                hint = " (this project needs transformers>=5; vLLM releases before 0.19.1 require transformers<5)"
            elif name == "torch":
                hint = " (pip would replace the torch you installed; pin the torch this vLLM pins)"
            report.problems.append(f"{name}: no {kind} satisfies both vllm {declaration.version}'s "
                                   f"'{requirement}' and ours: {ours_text}{hint}")
        else:
            example = f" (newest: {both[-1]})" if kind == "released version" else ""
            report.notes.append(f"{name}: vllm {declaration.version} '{requirement}', ours {ours_text}: "
                                f"compatible{example}")
        if name == "torch" and pinned_version(requirement.specifier) and pinned_version(our_spec) is None:
            report.problems.append(f"torch: vllm {declaration.version} pins '{requirement}' but requirements-gpu.txt "
                                   "does not pin torch; pin the same version so that pip keeps one torch")
    if installed is not None:
        report.problems.extend(check_installed(requirements, declaration, env=env, installed=installed))
    return report


def check_installed(requirements: Sequence[tuple[Requirement, str]], declaration: Declaration, *,
                    env: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """Installed versions against our requirements, vLLM's overlapping ones, the vLLM pin, and a CUDA torch."""
    problems = []
    ours = combined_specifiers(requirements, env)
    declared = declared_requirements(declaration, env)
    for name, (spec, sources) in sorted(ours.items()):
        version = installed.get(name)
        if version is None:
            problems.append(f"{name} is not installed (ours: {'; '.join(sources)})")
        elif not spec.contains(version, prereleases=True):
            problems.append(f"{name} {version} is installed; ours: {'; '.join(sources)}")
        if name in declared and version is not None and not declared[name].specifier.contains(version, True):
            problems.append(f"{name} {version} is installed; vllm {declaration.version} needs '{declared[name]}'")
    torch_version = installed.get("torch")
    if torch_version is not None and Version(torch_version).local and "cpu" in Version(torch_version).local:
        problems.append(f"torch {torch_version} is a CPU build; vLLM needs the CUDA build "
                        "(pip install -r requirements-gpu.txt in a fresh environment)")
    return problems


# --- sources of the declaration ----------------------------------------------------------------------------------


def parse_metadata(text: str, source: str) -> Declaration:
    """A :class:`Declaration` from the text of a ``METADATA`` / ``PKG-INFO`` file."""
    message = Parser().parsestr(text)
    return Declaration(version=message["Version"], requires_dist=message.get_all("Requires-Dist") or [],
                       requires_python=message["Requires-Python"], source=source)


def installed_declaration() -> Declaration | None:
    try:
        distribution = importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Declaration(version=distribution.version, requires_dist=distribution.requires or [],
                       requires_python=distribution.metadata["Requires-Python"],
                       source=f"installed vllm {distribution.version} (importlib.metadata)")


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def recorded_declaration(version: str) -> Declaration | None:
    record = RECORDED_RELEASES.get(version)
    if record is None:
        return None
    return Declaration(version=version, requires_dist=list(record["requires_dist"]),
                       requires_python=record["requires_python"],
                       source=f"vllm {version}'s metadata as recorded in {Path(__file__).name} (offline)")


class _HttpRangeFile(io.RawIOBase):
    """A read-only seekable file over HTTP range requests (to read a wheel's METADATA without downloading it)."""

    def __init__(self, url: str, size: int):
        self.url, self.size, self.position = url, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def readinto(self, buffer) -> int:
        if self.position >= self.size or not len(buffer):
            return 0
        end = min(self.size, self.position + len(buffer)) - 1
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.position}-{end}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def _simple_index(name: str) -> dict:
    request = urllib.request.Request(PYPI_SIMPLE.format(name=name),
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def pypi_released_versions(name: str) -> list[str]:
    """Released (not yanked) versions of ``name`` on PyPI, from its simple index."""
    index = _simple_index(name)
    yanked = {f["filename"] for f in index["files"] if f.get("yanked")}
    versions = set()
    for file in index["files"]:
        if file["filename"] in yanked:
            continue
        prefix = "[-_.]+".join(re.escape(part) for part in canonicalize_name(name).split("-"))
        match = re.match(rf"{prefix}-([^-]+?)(?:-|\.tar\.gz$|\.zip$)", file["filename"], flags=re.I)
        if match:
            try:
                versions.add(str(Version(match.group(1))))
            except InvalidVersion:
                continue
    return sorted(versions, key=Version)


def pypi_declaration(version: str) -> Declaration:
    """vllm ``version``'s wheel METADATA (manylinux x86_64) from PyPI; PyPI's JSON as the last resort."""
    wheels = [f for f in _simple_index("vllm")["files"]
              if re.match(rf"vllm-{re.escape(version)}-cp\d+-\w+-manylinux\w*x86_64\.whl$", f["filename"])]
    if wheels:
        wheel = wheels[0]
        if wheel.get("core-metadata") or wheel.get("data-dist-info-metadata"):
            with urllib.request.urlopen(wheel["url"] + ".metadata", timeout=60) as response:
                return parse_metadata(response.read().decode(), f"PyPI: {wheel['filename']}.metadata")
        reader = io.BufferedReader(_HttpRangeFile(wheel["url"], int(wheel["size"])), buffer_size=1 << 16)
        with zipfile.ZipFile(reader) as archive:
            member = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
            return parse_metadata(archive.read(member).decode(), f"PyPI: {wheel['filename']} ({member})")
    with urllib.request.urlopen(PYPI_JSON.format(name="vllm", version=version), timeout=60) as response:
        info = json.load(response)["info"]
    return Declaration(version=version, requires_dist=info.get("requires_dist") or [],
                       requires_python=info.get("requires_python"),
                       source=f"PyPI JSON for vllm {version} (no manylinux x86_64 wheel; may differ from a wheel's)")


# --- command line ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", nargs="+", default=[str(REPO_ROOT / f) for f in DEFAULT_FILES],
                        help="requirement files (-r includes are followed); default: requirements.txt "
                             "requirements-gpu.txt")
    parser.add_argument("--pypi", action="store_true", help="read the pinned vLLM release's metadata and the "
                        "released versions of the overlapping packages from PyPI")
    parser.add_argument("--vllm_metadata", default=None, help="a vLLM METADATA file to check against instead")
    parser.add_argument("--vllm_version", default=None, help="with --pypi: check this release instead of the pin")
    parser.add_argument("--python", default=None, help="target Python version for markers and Requires-Python "
                        "(default: this interpreter)")
    parser.add_argument("--no_installed", action="store_true", help="do not check the installed packages")
    parser.add_argument("--verbose", action="store_true", help="also list the compatible packages")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = target_environment(args.python)
    requirements = read_requirement_files(args.requirements)
    pin = pinned_version(combined_specifiers(requirements, env).get("vllm", (SpecifierSet(), []))[0])
    local = None if args.no_installed else installed_declaration()
    if args.vllm_metadata:
        declaration = parse_metadata(Path(args.vllm_metadata).read_text(encoding="utf-8"), args.vllm_metadata)
    elif args.pypi and (args.vllm_version or pin):
        declaration = pypi_declaration(args.vllm_version or pin)
    elif local is not None:
        declaration = local
    elif pin is not None and recorded_declaration(pin) is not None:
        declaration = recorded_declaration(pin)
    else:
        reason = "no exact vllm pin in the requirement files" if pin is None else f"vllm {pin} is not recorded here"
        print(f"cannot check: {reason} and vLLM is not installed; pass --pypi or --vllm_metadata FILE")
        return 2
    released = None
    if args.pypi:
        overlap = set(declared_requirements(declaration, env)) & set(combined_specifiers(requirements, env))
        released = {name: pypi_released_versions(name) for name in sorted(overlap)}
    installed = None
    if local is not None:
        names = set(combined_specifiers(requirements, env)) | set(declared_requirements(declaration, env))
        installed = installed_versions(names)
    report = check_declaration(requirements, declaration, env=env, released=released, installed=installed,
                               compare_pin=not (args.pypi and args.vllm_version))
    print(f"checked: {', '.join(Path(p).name for p in args.requirements)} against {declaration.source}; "
          f"Python {env['python_full_version']}, linux x86_64"
          + ("; installed packages too" if installed is not None else "; installed packages not checked (no vllm)"))
    for note in report.notes if args.verbose else []:
        print(f"  ok        {note}")
    for problem in report.problems:
        print(f"  CONFLICT  {problem}")
    print("consistent" if not report.problems else f"{len(report.problems)} conflict(s)")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
