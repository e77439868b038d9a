"""One-line error messages: what a long job prints, a reject list stores, or a CLI ends with."""


def one_line(error, limit: int = 300, *, keep: str = 'head', with_type: bool = False) -> str:
  """An exception (or any text) squeezed onto one line of at most `limit` characters.

  keep='head' keeps the start (our own messages name the culprit first); keep='tail' keeps the
  end (ITK and other C++ libraries put source locations first and the reason last).
  with_type prefixes the exception's class name (`KeyError: ...`) for library errors whose
  message alone is ambiguous. An empty message falls back to the class name.
  """
  text = ' '.join(str(error).split())
  if len(text) > limit:
    text = text[:limit] if keep == 'head' else '...' + text[-limit:]
  if isinstance(error, BaseException):
    if not text:
      return type(error).__name__
    if with_type:
      return f'{type(error).__name__}: {text}'
  return text
