"""The one error a user's input earns: `UsageError` (a ValueError). Its message names the value and what was
expected; a stage's `main` (pipelines.cli.stage_main) prints it as one line and exits 2, with no traceback.
Raised wherever the input is first seen to be wrong, before Ray starts where it can be checked then."""

from __future__ import annotations


class UsageError(ValueError):
    """Wrong input from the user (a path, a URI, a config value, an environment variable): not a bug."""
