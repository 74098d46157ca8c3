"""``python -m gpuspawner.admin``: the admin page, as the Hub runs it (a managed service)."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
