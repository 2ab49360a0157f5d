from kiln.loadtests.reliability.cli import main

raise SystemExit(main())
