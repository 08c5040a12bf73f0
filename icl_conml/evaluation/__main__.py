"""``python -m icl_conml.evaluation [compare] ...``: see ``cli.py``."""

import sys

from .cli import main

sys.exit(main())
