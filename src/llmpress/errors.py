"""The one exception users see: its message is a single line that says what to change."""


class LlmpressError(ValueError):
    """Bad input or an impossible plan; the message names the value and the fix."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
