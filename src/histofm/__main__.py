"""``python -m histofm`` (also what ``torchrun -m histofm`` runs)."""

import sys

from histofm.cli import main

sys.exit(main())
