"""The one exception type of the input pipeline."""


class DataError(ValueError):
  """A problem with the data or its configuration.

  The message names the file, folder or config field at fault and says what to do about it.
  """
