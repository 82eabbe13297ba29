"""`python -m ldm.convert`: the same command as `python -m ldm.checkpoints.convert`."""

import sys

from ldm.checkpoints.convert import main

if __name__ == "__main__":
    sys.exit(main())
