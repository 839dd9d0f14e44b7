"""A unit's ``SystemCallFilter=`` applied without systemd, to run the daemon under it.

The units confine the whole service (supervisor, zygote, workers, the image servers
they start) to a system-call allow-list.  No systemd runs as PID 1 in the test
environment or in the real-Xen tier's Dom0, so this module does what systemd's
``config_parse_syscall_filter`` and ``seccomp_load_syscall_filter_set_raw`` do:

* ``resolve``: the unit's ``SystemCallFilter=`` lines in order (the first one an
  allow-list: later plain entries add to it, ``~`` entries take away), groups expanded
  with ``systemd-analyze syscall-filter`` (the host's systemd, Debian 12's in CI and in
  the tier), ``@default`` always allowed as systemd does, and
  ``SystemCallErrorNumber=`` as the answer to the rest; ``RestrictAddressFamilies=AF_UNIX``
  as ``socket``/``socketpair`` for AF_UNIX only.  Written as JSON.
* ``exec``: load that filter into this process with the daemon's own libseccomp
  binding, then ``exec`` the command (the filter stays, as under systemd).

``python3 unit_filter.py resolve systemd/virtio-diskd.service > f.json``;
``python3 unit_filter.py exec f.json -- virtio-diskd --foreground ...``.
"""

from __future__ import annotations

import errno
import json
import os
import sys


def filter_settings(unit_text: str) -> tuple[list[str], str, str]:
    """The unit's SystemCallFilter= values (in order), SystemCallErrorNumber= and
    RestrictAddressFamilies=."""
    filters, error_number, families = [], "", ""
    for line in unit_text.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "SystemCallFilter":
            filters.append(value.strip())
        elif key == "SystemCallErrorNumber":
            error_number = value.strip()
        elif key == "RestrictAddressFamilies":
            families = value.strip()
    return filters, error_number, families


def systemd_groups() -> dict[str, list[str]]:
    """Every ``@group`` systemd knows, with its members (names and groups)."""
    import subprocess  # not on the way to exec: a Dom0 under TCG pays for every import

    text = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                          text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith((" ", "\t")) and current is not None:
            item = line.strip()
            if item and not item.startswith("#"):
                current.append(item)
        else:
            current = None
    return groups


def expand(item: str, groups: dict[str, list[str]], seen: frozenset[str] = frozenset(),
           ) -> set[str]:
    if not item.startswith("@"):
        return {item}
    if item not in groups:
        raise ValueError(f"systemd has no system-call group {item}")
    names: set[str] = set()
    for member in groups[item]:
        if member not in seen:
            names |= expand(member, groups, seen | {item})
    return names


def resolve(unit_text: str, groups: dict[str, list[str]]) -> dict[str, object]:
    """What the unit lets its processes call, as systemd would build it."""
    filters, error_number, families = filter_settings(unit_text)
    if not filters:
        raise ValueError("the unit has no SystemCallFilter=")
    if filters[0].startswith("~"):
        raise ValueError("only an allow-list first is emulated here")
    allowed = expand("@default", groups)
    for value in filters:
        deny = value.startswith("~")
        for item in value.lstrip("~").split():
            names = expand(item, groups)
            allowed = allowed - names if deny else allowed | names
    unix_only = ["socket", "socketpair"] if families == "AF_UNIX" else []
    refuse = getattr(errno, error_number, None) if error_number else None
    if error_number and refuse is None:
        raise ValueError(f"SystemCallErrorNumber={error_number} is not an errno name")
    return {"allowed": sorted(allowed - set(unix_only)), "unix_only": unix_only,
            # systemd's default action for a call outside the list kills the process
            "refuse_with": refuse, "errno_name": error_number or "SIGSYS"}


def exec_under(filter_path: str, command: list[str]) -> None:
    from virtio_diskd.daemon import syscall_filter

    with open(filter_path, encoding="utf-8") as f:
        spec = json.load(f)
    refuse = spec["refuse_with"] if spec["refuse_with"] is not None else errno.EPERM
    prepared = syscall_filter.prepare(tuple(spec["allowed"]), refuse_with=refuse,
                                      unix_only=tuple(spec["unix_only"]))
    prepared.load()
    stamp = os.environ.pop(EXEC_STAMP_ENV, None)
    if stamp:  # where this wrapper's own time ends and the service's begins
        with open("/proc/uptime", encoding="ascii") as uptime, \
                open(stamp, "w", encoding="ascii") as out:
            out.write(uptime.read().split()[0] + "\n")
    os.execvp(command[0], command)


#: ``exec``: a file to write the system's uptime to just before the command is executed
#: (the real-Xen tier measures the daemon's start from there: under systemd no Python
#: wrapper applies the filter, so the wrapper's own seconds are not the daemon's).
EXEC_STAMP_ENV = "VD_EXEC_STAMP"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "resolve":
        groups = systemd_groups()
        with open(argv[1], encoding="utf-8") as unit:
            json.dump(resolve(unit.read(), groups), sys.stdout)
        return 0
    if len(argv) >= 4 and argv[0] == "exec" and argv[2] == "--":
        exec_under(argv[1], argv[3:])
        return 127
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
