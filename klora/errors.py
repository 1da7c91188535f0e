"""The one exception type the command lines turn into a one-line error and exit code 2."""


class KLoRAError(ValueError):
    """A problem with the user's input: the message says what is wrong and what to do."""
