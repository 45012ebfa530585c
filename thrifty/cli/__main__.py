"""``python -m thrifty.cli ...`` (also what ``torchrun -m thrifty.cli train ...`` runs)."""
import sys

from thrifty.cli import main

sys.exit(main())
