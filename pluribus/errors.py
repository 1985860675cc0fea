"""User-facing errors: one clear line naming what is wrong and how to fix it; the CLI exits with code 2."""


class PluribusError(Exception):
    """Bad input from the user (config, files, models, data). The message is shown as is, on one line."""
