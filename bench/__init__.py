"""VQ-bench: the shared harness (data, models, training, evaluation, records, reports, launching)."""


class UserError(Exception):
    """An error the user caused and can fix; its message names the fix. The CLI prints it on one line, exit 2."""
