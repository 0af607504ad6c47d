"""Errors a user can cause; the CLI prints their one-line message instead of a traceback."""


class PeftlabError(ValueError):
    """A user mistake with a message that names what was wrong and what is allowed."""


class SpecError(PeftlabError):
    """A spec that cannot be applied to this model."""


class AdapterLoadError(PeftlabError):
    """A saved adapter that cannot be loaded onto this model."""
