"""`python -m kiln.cli ...` is `kiln ...`."""

from kiln.cli.main import main

raise SystemExit(main())
