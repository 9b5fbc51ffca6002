"""User-facing errors: each says what was wrong and what to do. CLIs print them without a traceback."""


class JaxconceptError(Exception):
    """Base class for errors caused by user input (bad files, names, settings)."""


class ModelSourceError(JaxconceptError):
    """A model source (folder, hub id, named config) that cannot be loaded."""


class ConceptTokenError(JaxconceptError):
    """A concept token or init word that cannot be used."""


class PromptError(JaxconceptError):
    """A prompt that the text encoder cannot take."""


class ShardingError(JaxconceptError):
    """A batch or mesh that does not fit the devices."""
