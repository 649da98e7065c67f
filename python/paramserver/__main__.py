"""``python -m paramserver``: the same as the ``paramserver`` command."""

import sys

from paramserver.cli import main

sys.exit(main())
