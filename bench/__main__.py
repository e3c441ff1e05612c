"""``python -m bench <command> …``: see :mod:`bench.cli`."""

from bench.cli import main

raise SystemExit(main())
