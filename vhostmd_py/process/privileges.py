"""Dropping root privileges for -u USER.

Upstream (vhostmd.c) calls setgid/setuid but keeps root's supplementary
groups, so the "unprivileged" daemon can still read or write whatever the
root groups (disk, kvm, ...) can. We drop them with setgroups([gid]) first,
and refuse a USER that maps to uid 0 (it would drop nothing).
"""

from __future__ import annotations

import logging
import os
import pwd
from dataclasses import dataclass
from typing import Callable

from vhostmd_py.errors import PrivilegeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """The user we switch to: name, uid and primary gid."""

    user: str
    uid: int
    gid: int


def resolve_user(
    user: str, *, getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam
) -> Identity:
    """Look USER up; PrivilegeError when unknown or root."""
    try:
        entry = getpwnam(user)
    except KeyError as err:
        raise PrivilegeError(user, "no such user") from err
    if entry.pw_uid == 0:
        raise PrivilegeError(user, "refusing to run as root")
    return Identity(user=user, uid=entry.pw_uid, gid=entry.pw_gid)


def drop_privileges(ident: Identity) -> None:
    """Become IDENT for good: supplementary groups, then gid, then uid (order matters)."""
    try:
        os.setgroups([ident.gid])
        os.setgid(ident.gid)
        os.setuid(ident.uid)
    except OSError as err:
        raise PrivilegeError(ident.user, err.strerror or str(err)) from err
    # setuid() from root drops the saved uid too; prove it cannot be undone.
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - would mean the kernel kept a saved root uid
        raise PrivilegeError(ident.user, "privileges could be regained after setuid")
    log.info("Running as user %s (uid %d, gid %d)", ident.user, ident.uid, ident.gid)
