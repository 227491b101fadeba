"""``python -m server.cli``: the ``pigeon`` command."""

import sys

from server.cli.main import main

sys.exit(main())
