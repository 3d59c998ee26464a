"""``python -m beamstream``: the same as the ``beamstream`` command."""

import sys

from beamstream.cli.main import main

sys.exit(main())
