"""``python -m chatlib``: the same as ``python broker.py`` or ``chat-server``."""

import sys

from broker import main

if __name__ == "__main__":
    sys.exit(main())
