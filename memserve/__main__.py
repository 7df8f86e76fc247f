"""`python -m memserve` is the `memserve` command."""

from memserve.cli import main

raise SystemExit(main())
