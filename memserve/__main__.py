"""`python -m memserve` is the `memserve` command."""

from memserve.cli import main

if __name__ == "__main__":  # not when a model process (spawn) imports it
    raise SystemExit(main())
