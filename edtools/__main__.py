"""`python -m edtools`: the same as the `edtools` command.

See edtools.cli for the subcommands.
"""

import sys

from .cli import main

sys.exit(main())
