"""``python -m raypo.cli ...`` is the ``raypo`` command."""

import sys

from raypo.cli.main import main

sys.exit(main())
