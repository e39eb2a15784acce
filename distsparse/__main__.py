"""``python -m distsparse inspect FILE`` / ``verify FILE``: see :mod:`distsparse.cli`."""

import sys

from .cli import main

sys.exit(main())
