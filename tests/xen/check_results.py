"""Judge a real-Xen tier run from its serial log: every expected scenario must report.

    python check_results.py SERIAL_LOG SCENARIO [SCENARIO ...]

A scenario passes only with a ``VDRESULT <name> PASS`` line.  One that printed FAIL,
or printed nothing at all (the DomU hung, the boot died half-way, the timeout hit),
fails the run: a missing line is a failure, never a pass by omission.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def judge(log: str, expected: list[str]) -> dict[str, str]:
    """Scenario -> PASS, FAIL or MISSING (the last word a scenario reported wins)."""
    found: dict[str, str] = {}
    for match in re.finditer(r"VDRESULT (\S+) (PASS|FAIL)", log):
        found[match.group(1)] = match.group(2)
    return {name: found.get(name, "MISSING") for name in expected}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    log = Path(argv[0]).read_text(errors="replace")
    verdicts = judge(log, argv[1:])
    for name, verdict in verdicts.items():
        print(f"  {verdict:<7} {name}")
    bad = [name for name, verdict in verdicts.items() if verdict != "PASS"]
    if bad:
        print(f"real-Xen tier: {len(bad)} of {len(verdicts)} scenarios did not pass: "
              f"{', '.join(bad)}")
        return 1
    print(f"real-Xen tier: all {len(verdicts)} scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
