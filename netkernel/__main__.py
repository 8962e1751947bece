"""``python -m netkernel``: the same as the ``netkernel`` command."""

import sys

from netkernel.cli import main

sys.exit(main())
