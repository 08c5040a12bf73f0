"""``python -m icl_conml.convert_garg STATE_PT CONFIG_YAML OUT_DIR``: a Garg et al. checkpoint as an
``ICLModel`` folder (see ``icl_conml.garg``)."""

import sys

from .garg import main

if __name__ == "__main__":
    sys.exit(main())
