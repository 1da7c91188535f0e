"""The project's exceptions, at the bottom of the package: any module may raise them, this imports nothing.

The command lines turn ``KLoRAError`` (and so ``LoRAError``) into one ``error:`` line and exit code 2;
the ComfyUI node shows the same line as the node's error.
"""


class KLoRAError(ValueError):
    """A problem with the user's input: the message says what is wrong and what to do."""


class LoRAError(KLoRAError):
    """A user-facing problem with a LoRA file: one line that names the file and says what to fix."""
