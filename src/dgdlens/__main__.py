"""``python -m dgdlens ...``: the command line, also under launchers (``torchrun -m dgdlens train ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
