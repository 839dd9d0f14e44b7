"""Coverage-guided fuzzing of ring parsing and register writes with atheris (libFuzzer).

    python tests/fuzz/run_fuzz.py tests/fuzz/corpus -max_total_time=60

New interesting inputs go into the corpus directory (keep them: the corpus is in the
repository and replayed by the tests); a crash is written to ``crash-<sha1>`` in the
current directory — turn it into a regression test.  ``.ci/run`` runs it for a
bounded time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # vdtest

with atheris.instrument_imports(include=["virtio_diskd.backend"]):
    from fuzz.ring_target import one_input


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
