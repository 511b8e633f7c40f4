"""The one exception type the data side raises for bad input."""


class DataError(ValueError):
    """Bad or missing data. The message is one line that names the file or field."""
