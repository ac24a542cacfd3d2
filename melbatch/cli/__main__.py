"""``python -m melbatch.cli …``: the same as the ``melbatch`` command."""

import sys

from melbatch.cli.commands import main

sys.exit(main())
