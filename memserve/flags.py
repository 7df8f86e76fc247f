"""A command-line flag for every server setting, shared by `memserve serve` and `memserve
cluster` (which passes them on to every replica)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_setting_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, skip: Sequence[str] = ()
) -> None:
    """A flag for every server setting but those in `skip` (default None: not given)."""
    from serving import config

    defaults = config.ServerConfig()
    for name, field in config.FIELDS.items():
        if name in skip:
            continue
        default = getattr(defaults, name)
        env = f"env {config.ENV_PREFIX}{name.upper()}"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar=name.upper(),
            default=None,
            help=f"{field.metadata['help']} ["
            + (f"default: {default}; " if default not in ("", ()) else "")
            + env
            + "]",
        )
