"""``python -m pipelines.cli``: the ``step`` console script (what ``step submit`` runs)."""

import sys

from pipelines.cli.app import main

sys.exit(main())
