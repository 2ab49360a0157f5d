from kiln.loadtests.studies.reliability.cli import main

raise SystemExit(main())
