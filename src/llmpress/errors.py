"""The one exception users see: its message is a single line that says what to change."""


class LlmpressError(ValueError):
    """Bad input or an impossible plan; the message names the value and the fix."""
