"""The OS packages (scripts/build-packages): what the .debs and the RPMs hold.

The build runs dpkg-buildpackage and rpmbuild on a copy of this checkout
(about a minute; `slow`); the contents are read back with dpkg-deb and
rpm -qlp, and the host package's own code is run from the unpacked .deb.
The installs themselves are proved in fresh Debian roots by
scripts/check-packages (root, debootstrap: not part of the suite).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from helpers import REPO

BUILD_TIMEOUT_S = 900
MAN_PAGES = {"vhostmd.8", "vhostmd.conf.5", "vhostmdctl.1", "vm-dump-metrics.1"}
CONFFILES = {"/etc/vhostmd/vhostmd.conf", "/etc/vhostmd/vhostmd.dtd", "/etc/vhostmd/metric.dtd",
             "/etc/libvirt/hooks/qemu.d/vhostmd"}


def _pyproject_version(path: Path) -> str:
    match = re.search(r'^version = "([^"]+)"$', path.read_text(), re.M)
    assert match, path
    return match.group(1)


def test_every_version_is_the_same() -> None:
    """pyproject (host, guest, the host's pin), __version__, debian/changelog and the spec agree."""
    import vhostmd_guest
    import vhostmd_wire

    import vhostmd_py

    version = _pyproject_version(REPO / "pyproject.toml")
    assert _pyproject_version(REPO / "guest" / "pyproject.toml") == version
    assert f'"vhostmd-py-guest=={version}"' in (REPO / "pyproject.toml").read_text()
    assert vhostmd_py.__version__ == version
    assert vhostmd_guest.__version__ == vhostmd_wire.__version__ == version
    changelog = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"vhostmd-py ({version}) "), changelog
    spec = (REPO / "packaging" / "rpm" / "vhostmd-py.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(version)}$", spec, re.M)


def test_every_man_page_is_packaged() -> None:
    """docs/man's pages are all in debian/*.manpages and in the spec's %files."""
    assert {p.name for p in (REPO / "docs" / "man").iterdir()} == MAN_PAGES
    listed = set()
    for manpages in (REPO / "debian").glob("*.manpages"):
        listed |= {Path(line).name for line in manpages.read_text().split()}
    assert listed == MAN_PAGES
    spec = (REPO / "packaging" / "rpm" / "vhostmd-py.spec").read_text()
    for page in MAN_PAGES:
        assert f"/{page}*" in spec, page


def _deb_files(deb: Path) -> Dict[str, str]:
    """path -> mode string (dpkg-deb -c), paths without the leading '.'."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                         check=True).stdout
    files = {}
    for line in out.splitlines():
        fields = line.split()
        path = fields[5][1:] if fields[5] != "./" else "/"
        files[path.rstrip("/") or "/"] = fields[0]
    return files


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True,
                          check=True).stdout.strip()


def _rpm(*args: str) -> List[str]:
    return subprocess.run(["rpm", *args], capture_output=True, text=True,
                          check=True).stdout.splitlines()


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/build-packages into a temporary dist/ (both kinds)."""
    if os.geteuid() != 0 and not (shutil.which("dpkg-buildpackage") and shutil.which("rpmbuild")):
        pytest.skip("the build tools are missing and installing them needs root")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(REPO / "scripts" / "build-packages"), str(out)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, (pattern, [p.name for p in dist.iterdir()])
    return found[0]


@pytest.mark.slow
def test_host_deb(dist: Path, tmp_path: Path) -> None:
    """vhostmd-py_VERSION_ARCH.deb: the layout, conffiles, Debian dependencies only, runnable."""
    deb = _one(dist, "vhostmd-py_*_*.deb")
    files = _deb_files(deb)
    for path in ("/usr/sbin/vhostmd", "/usr/bin/vhostmdctl",
                 "/etc/libvirt/hooks/qemu.d/vhostmd"):
        assert files[path].startswith("-rwxr-xr-x"), path
    assert "/lib/systemd/system/vhostmd.service" in files
    for page in ("man8/vhostmd.8.gz", "man5/vhostmd.conf.5.gz", "man1/vhostmdctl.1.gz"):
        assert f"/usr/share/man/{page}" in files, page
    site = "/usr/lib/python3/dist-packages/vhostmd_py"
    assert any(re.match(rf"{site}/publish/_mdisk\.cpython-.*\.so$", p) for p in files)
    assert any(re.match(rf"{site}/sources/shell/_runner\.cpython-.*\.so$", p) for p in files)
    # Nothing pip would have put there, nothing outside the distribution's paths.
    assert not [p for p in files if "dist-info" in p or "egg-info" in p or "site-packages" in p
                or p.startswith("/usr/local") or p.startswith("/opt")]
    depends = _deb_field(deb, "Depends")
    for dep in ("python3-libvirt", "python3-lxml", "python3-cffi-backend", "python3-click",
                "python3-rrdtool", "adduser", "vhostmd-py-guest"):
        assert re.search(rf"(^|, ){dep}\b", depends), (dep, depends)
    assert "python3-prometheus-client" in _deb_field(deb, "Recommends")
    assert "pip" not in depends

    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert set((control / "conffiles").read_text().split()) == CONFFILES
    assert "adduser --system" in (control / "postinst").read_text()
    assert "rm -rf /var/lib/vhostmd" in (control / "postrm").read_text()

    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    copyright_ = (root / "usr/share/doc/vhostmd-py/copyright").read_text()
    assert "License: LGPL-2.1+" in copyright_
    assert "/usr/share/common-licenses/LGPL-2.1" in copyright_
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(root / "lib/systemd/system/vhostmd.service")
    assert unit["Service"]["ExecStart"].split()[0] == "/usr/sbin/vhostmd"
    assert unit["Unit"]["Documentation"].split() == ["man:vhostmd(8)", "man:vhostmd.conf(5)"]
    assert (root / "etc/vhostmd/vhostmd.conf").read_bytes() == (REPO / "vhostmd.conf").read_bytes()

    # The packaged code, with its compiled extensions, runs (this interpreter
    # stands in for Debian's python3 of the same version).
    if f"cpython-{sys.version_info.major}{sys.version_info.minor}-" not in " ".join(files):
        pytest.skip("the package was built for another python3 than this one")
    site_dir = root / "usr/lib/python3/dist-packages"
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]);"
         "import vhostmd_py, vhostmd_py.publish._mdisk, vhostmd_py.sources.shell._runner;"
         "print(vhostmd_py.__file__)", str(site_dir)],
        capture_output=True, text=True, cwd="/", check=True,
    )
    assert probe.stdout.startswith(str(root)), probe.stdout


@pytest.mark.slow
def test_guest_deb(dist: Path) -> None:
    """vhostmd-py-guest_VERSION_all.deb: vm-dump-metrics, the two packages, its man page."""
    deb = _one(dist, "vhostmd-py-guest_*_all.deb")
    assert _deb_field(deb, "Architecture") == "all"
    files = _deb_files(deb)
    assert files["/usr/bin/vm-dump-metrics"].startswith("-rwxr-xr-x")
    assert "/usr/share/man/man1/vm-dump-metrics.1.gz" in files
    assert "/usr/share/doc/vhostmd-py-guest/copyright" in files
    for package in ("vhostmd_wire", "vhostmd_guest"):
        assert f"/usr/lib/python3/dist-packages/{package}/__init__.py" in files
    assert not [p for p in files if p.endswith(".so") or "dist-info" in p]


@pytest.mark.slow
def test_rpms(dist: Path) -> None:
    """The source RPM and the binary RPMs: config files, unit, man pages, hook, %license."""
    srpm = _one(dist, "vhostmd-py-*.src.rpm")
    assert sorted(_rpm("-qlp", str(srpm))) == sorted(
        ["vhostmd-py.spec", f"vhostmd-py-{_pyproject_version(REPO / 'pyproject.toml')}.tar.gz"])
    host = _one(dist, f"vhostmd-py-[0-9]*.{os.uname().machine}.rpm")
    files = set(_rpm("-qlp", str(host)))
    for path in ("/usr/sbin/vhostmd", "/usr/bin/vhostmdctl",
                 "/usr/lib/systemd/system/vhostmd.service", "/usr/share/man/man8/vhostmd.8",
                 "/usr/share/man/man5/vhostmd.conf.5", "/usr/share/man/man1/vhostmdctl.1"):
        assert path in files, path
    assert any(re.search(r"/licenses/vhostmd-py[^/]*/COPYING$", p) for p in files)
    assert any(re.search(r"/vhostmd_py/publish/_mdisk\.cpython-.*\.so$", p) for p in files)
    assert not [p for p in files if "dist-info" in p or p.startswith("/usr/local")]
    assert set(_rpm("-qcp", str(host))) == CONFFILES
    requires = set(_rpm("-qp", "--requires", str(host)))
    assert {"python3-libvirt", "python3-lxml", "python3-cffi", "python3-click",
            "python3-rrdtool", "libvirt-client"} <= requires
    assert "useradd -r" in "\n".join(_rpm("-qp", "--scripts", str(host)))
    guest = _one(dist, "vhostmd-py-guest-*.noarch.rpm")
    gfiles = set(_rpm("-qlp", str(guest)))
    assert {"/usr/bin/vm-dump-metrics", "/usr/share/man/man1/vm-dump-metrics.1"} <= gfiles
    assert any(p.endswith("/COPYING") for p in gfiles)
