"""``python -m bench``: the paper's figures (bench/paper.py; ``--help`` for the options)."""

import sys

from bench.paper import main

sys.exit(main())
