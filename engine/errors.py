"""Errors a user can act on: the CLI and the GUI print their message alone, without a traceback."""


class UserError(Exception):
    """Something the user can fix: a bad config, a missing folder, a model that does not fit."""
