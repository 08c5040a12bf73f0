"""``python -m icl_conml.experiment``."""

import sys

from .cli import main

sys.exit(main())
