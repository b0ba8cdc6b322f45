"""`python -m crma ablate ...` (see `crma.ablation.cli`)."""

from __future__ import annotations

import sys

from crma.ablation.cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli())
