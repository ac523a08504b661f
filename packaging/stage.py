"""Lay out the host's or the guest's Python code for an OS package (.deb, RPM).

The distributions build with their own setuptools, older than the one
pyproject.toml's metadata needs (Debian 12 ships 66, RHEL 9 53; the SPDX
``license`` string needs 77), so an OS package does not go through a wheel:

    python3 packaging/stage.py build host --build DIR
        copies vhostmd_py into DIR and compiles its cffi extensions
        (csrc/build.py) there with this interpreter;
    python3 packaging/stage.py install host --build DIR --dest DESTDIR \
            --site /usr/lib/python3/dist-packages --python /usr/bin/python3
        copies DIR's packages into DESTDIR/SITE and writes the commands of
        pyproject.toml's [project.scripts] (vhostmd in /usr/sbin, the others
        in /usr/bin) as scripts run by --python.

``guest`` does the same for guest/ (vhostmd_wire, vhostmd_guest: pure
Python, nothing to compile). Runs on Python 3.6 and later, standard
library only (plus cffi to build the host).
"""

import argparse
import importlib.util
import os
import re
import shutil
from typing import Any, Dict, List

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Daemons go to sbin (their man pages are section 8); the rest to bin.
SBIN = ("vhostmd",)
# What a source tree may hold beside the code that must not be installed
# (an editable install's extensions, cffi's generated C, caches).
_SKIP = re.compile(r"(\.so|\.c|\.o|\.pyc)$")


class Part:
    """One distribution: where its pyproject.toml is, and its import packages."""

    def __init__(self, name: str, project: str, packages: List[str]) -> None:
        self.name = name
        self.project = project
        self.packages = packages


PARTS = {
    "host": Part("host", SRC, ["vhostmd_py"]),
    "guest": Part("guest", os.path.join(SRC, "guest"), ["vhostmd_wire", "vhostmd_guest"]),
}


def scripts(project: str) -> Dict[str, str]:
    """[project.scripts] of project/pyproject.toml: command name -> "module:function"."""
    with open(os.path.join(project, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    found: Dict[str, str] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
            continue
        match = re.match(r'^"?([A-Za-z0-9_.-]+)"?\s*=\s*"([A-Za-z0-9_.]+:[A-Za-z0-9_]+)"$', line)
        if section == "[project.scripts]" and match:
            found[match.group(1)] = match.group(2)
    if not found:
        raise SystemExit(f"stage: no [project.scripts] in {project}/pyproject.toml")
    return found


def copy_packages(part: Part, dest: str) -> None:
    for package in part.packages:
        top = os.path.join(part.project, package)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, part.project)
            os.makedirs(os.path.join(dest, rel), exist_ok=True)
            for name in sorted(filenames):
                if not _SKIP.search(name):
                    shutil.copy2(os.path.join(dirpath, name), os.path.join(dest, rel, name))


def build(part: Part, build_dir: str) -> None:
    build_dir = os.path.abspath(build_dir)
    if os.path.exists(build_dir):
        shutil.rmtree(build_dir)
    copy_packages(part, build_dir)
    if part.name != "host":
        return
    # csrc/build.py names its sources relative to the working directory (as
    # setup.py's cffi_modules want): compile from a copy beside the packages.
    shutil.copytree(os.path.join(SRC, "csrc"), os.path.join(build_dir, "csrc"))
    cwd = os.getcwd()
    os.chdir(build_dir)
    try:
        # By path: "build" is also the name of PyPA's build front end.
        path = os.path.join("csrc", "build.py")
        spec = importlib.util.spec_from_file_location("cffi_build", path)
        assert spec is not None and spec.loader is not None
        cffi_build: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cffi_build)
        for ffi in (cffi_build.mdisk_ffi, cffi_build.runner_ffi):
            ffi.compile(tmpdir=".", verbose=False)
    finally:
        os.chdir(cwd)
    shutil.rmtree(os.path.join(build_dir, "csrc"))
    for dirpath, _dirnames, filenames in os.walk(build_dir):
        for name in filenames:
            if name.endswith((".c", ".o")):
                os.unlink(os.path.join(dirpath, name))
    built = [n for _d, _s, names in os.walk(build_dir) for n in names if n.endswith(".so")]
    if len(built) != 2:
        raise SystemExit(f"stage: expected 2 compiled extensions in {build_dir}, found {built}")


def install(part: Part, build_dir: str, dest: str, site: str, python: str) -> None:
    target = os.path.join(dest, site.lstrip("/"))
    for package in part.packages:
        there = os.path.join(target, package)
        if os.path.exists(there):
            shutil.rmtree(there)
        shutil.copytree(os.path.join(build_dir, package), there)
    for command, entry in sorted(scripts(part.project).items()):
        module, function = entry.split(":")
        bindir = os.path.join(dest, "usr", "sbin" if command in SBIN else "bin")
        os.makedirs(bindir, exist_ok=True)
        path = os.path.join(bindir, command)
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                f"#!{python}\n"
                f"# {command}, as pyproject.toml's [project.scripts] names it.\n"
                "import sys\n\n"
                f"from {module} import {function}\n\n"
                f"sys.exit({function}())\n"
            )
        os.chmod(path, 0o755)


def main() -> None:
    parser = argparse.ArgumentParser(prog="stage", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "install"))
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--build", required=True, help="the build directory")
    parser.add_argument("--dest", default="/", help="install: the package's root (DESTDIR)")
    parser.add_argument("--site", default="/usr/lib/python3/dist-packages")
    parser.add_argument("--python", default="/usr/bin/python3")
    args = parser.parse_args()
    part = PARTS[args.part]
    if args.step == "build":
        build(part, args.build)
    else:
        install(part, os.path.abspath(args.build), os.path.abspath(args.dest), args.site,
                args.python)


if __name__ == "__main__":
    main()
