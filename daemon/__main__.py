"""``python -m virtio_diskd.daemon`` is the ``virtio-diskd`` command."""

import sys

from virtio_diskd.daemon.cli import main

sys.exit(main())
