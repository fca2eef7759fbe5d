"""`python -m harmprune.cli ...` (used by tests and process launchers)."""

from harmprune.cli.main import main

raise SystemExit(main())
