"""The runtime dependency closure of the package, pinned, for a wheel dir (used by scripts/wheelhouse.sh).

Starts from pyproject.toml's `dependencies` (plus the `deepspeed` extra, and `dev` with --dev), follows
each requirement through the metadata of the packages installed in the Python that runs this file (the
project's .venv, which scripts/setup.sh installs under requirements/constraints.txt), evaluates markers
for the *target* interpreter and platform, and prints one `name==version` line per package, sorted.

Left out, and not followed: torch, triton and the CUDA libraries (nvidia-*, except nvidia-ml-py, which
DeepSpeed needs): the target machine's image provides them. With --have FILE (`pip list --format=freeze`
of the target machine), a package whose version there satisfies every requirement the closure puts on it
is left out too, and so is whatever only it needs.

Exit status 1, with one line per problem, when a needed package is not installed here or its installed
version differs from its pin in requirements/constraints.txt (re-run scripts/setup.sh).
Standard library, plus `packaging` (pip's own copy when it is not installed).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
KEEP_NVIDIA = {"nvidia-ml-py"}  # NVML bindings DeepSpeed imports; not a CUDA library torch ships


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def excluded(name: str) -> bool:
    """Provided by the target machine's torch install."""
    name = canon(name)
    if name in KEEP_NVIDIA:
        return False
    return name in ("torch", "triton") or name.startswith(("nvidia-", "pytorch-triton"))


def marker_env(python: str, arch: str) -> dict[str, str]:
    full = python if python.count(".") >= 2 else f"{python}.0"
    short = ".".join(full.split(".")[:2])
    return {"python_version": short, "python_full_version": full, "implementation_version": full,
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": arch,
            "platform_release": "", "platform_version": "", "extra": ""}


def applies(req: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def project_requirements(project: Path, extras: set[str]) -> list[str]:
    """pyproject.toml's dependencies plus the given optional-dependency groups."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed package's metadata says the same
        reqs = metadata.requires("rlhf") or []
        return [r for r in reqs if "extra ==" not in r or any(f'extra == "{e}"' in r for e in extras)]
    data = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    out = list(data.get("dependencies", []))
    for extra in sorted(extras):
        out += data.get("optional-dependencies", {}).get(extra, [])
    return out


def read_pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file or a `pip list --format=freeze` output."""
    pins = {}
    if not path.is_file():
        return pins
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[canon(name.split("[", 1)[0])] = version.split(";", 1)[0].strip()
    return pins


class Closure:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.installed = {canon(d.metadata["Name"]): d for d in metadata.distributions() if d.metadata["Name"]}
        self.specs: dict[str, list[tuple[str, SpecifierSet]]] = {}  # package -> (required by, specifier)
        self.missing: dict[str, str] = {}  # package -> required by
        self.edges: dict[str, list[str]] = {}
        self.extra_edges: dict[str, list[str]] = {}  # what a package needs only for an extra asked of it

    def walk(self, roots: list[str]) -> None:
        queue: list[tuple[str, Requirement]] = [("pyproject.toml", Requirement(r)) for r in roots]
        seen: set[tuple[str, frozenset[str]]] = set()
        while queue:
            parent, req = queue.pop(0)
            name = canon(req.name)
            if excluded(name):
                continue
            self.specs.setdefault(name, []).append((parent, req.specifier))
            self.edges.setdefault(canon(parent) if parent != "pyproject.toml" else "", []).append(name)
            key = (name, frozenset(req.extras))
            if key in seen:
                continue
            seen.add(key)
            dist = self.installed.get(name)
            if dist is None:
                self.missing.setdefault(name, parent)
                continue
            for text in dist.requires or []:
                sub = Requirement(text)
                if applies(sub, self.env, set(req.extras)):
                    queue.append((dist.metadata["Name"], sub))
                    if not applies(sub, self.env, set()):
                        self.extra_edges.setdefault(name, []).append(canon(sub.name))

    def kept(self, have: dict[str, str]) -> set[str]:
        """Packages to ship: reachable from the roots without passing through one the target already has."""
        def satisfied(name: str) -> bool:
            if name not in have:
                return False
            try:
                version = Version(have[name])
            except InvalidVersion:
                return False
            return all(spec.contains(version, prereleases=True) for _, spec in self.specs.get(name, []))

        keep, seen, stack = set(), set(), list(self.edges.get("", []))
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if satisfied(name):  # the target has it, but maybe not what an extra asked of it needs
                stack += [n for n in self.extra_edges.get(name, []) if not excluded(n)]
                continue
            keep.add(name)
            stack += self.edges.get(name, [])
        return keep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="3.12", help="target Python version for markers (default 3.12)")
    p.add_argument("--arch", default="x86_64", help="target machine architecture for markers (default x86_64)")
    p.add_argument("--dev", action="store_true", help="add the test runner (pytest, pytest-timeout)")
    p.add_argument("--have", type=Path, metavar="FILE",
                   help="`pip list --format=freeze` of the target machine: leave out what it already has")
    p.add_argument("--constraints", type=Path, default=ROOT / "requirements" / "constraints.txt")
    p.add_argument("--project", type=Path, default=ROOT)
    args = p.parse_args(argv)

    roots = project_requirements(args.project, {"deepspeed"} | ({"dev"} if args.dev else set()))
    if args.dev:
        roots = [r for r in roots if canon(Requirement(r).name) != "ruff"]  # a linter; not needed to run tests
    closure = Closure(marker_env(args.python, args.arch))
    closure.walk(roots)
    have = read_pins(args.have) if args.have else {}
    keep = closure.kept(have)
    pins = read_pins(args.constraints)
    problems = []
    for name in sorted(keep & set(closure.missing)):
        problems.append(f"{name}: needed by {closure.missing[name]} on Python {args.python}, but not installed in "
                        f"{sys.prefix}; install it there (or pass --python of that interpreter)")
    lines = []
    for name in sorted(keep - set(closure.missing)):
        dist = closure.installed[name]
        version = dist.version
        if name in pins and pins[name] != version:
            problems.append(f"{name}: {version} installed in {sys.prefix}, but {args.constraints.name} pins "
                            f"{pins[name]}; re-run scripts/setup.sh")
        for parent, spec in closure.specs[name]:
            if not spec.contains(Version(version), prereleases=True):
                problems.append(f"{name}: {version} installed, but {parent} requires {name}{spec}")
        lines.append(f"{dist.metadata['Name']}=={version}")
    for line in problems:
        print(f"wheelhouse: {line}", file=sys.stderr)
    if problems:
        return 1
    left = sorted(set(closure.specs) - keep)
    if left:
        print(f"wheelhouse: left out {len(left)} that the target has, or that only those need: {' '.join(left)}",
              file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
