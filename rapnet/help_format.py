"""The help formatter the command-line tools share: every option's help shows its true default."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where that would mislead: on/off flags (their help
    says which way is the default) and options whose default is None (their help says what happens then, e.g.
    "default: auto" or "default: from the checkpoint")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)
