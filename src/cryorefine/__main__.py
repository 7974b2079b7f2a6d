"""``python -m cryorefine`` runs the same entry point as the console script."""

from cryorefine.cli import main

raise SystemExit(main())
