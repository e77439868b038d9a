"""The one error type of the preprocessing ops: a kind the runner can count and a one-line reason."""
from __future__ import annotations

# The runner's reject vocabulary (docs/INTERFACES.md, "Prep runner"), plus 'geometry' for slice
# positions that do not form one regular grid: a reject list is only useful if its kinds can be counted.
KINDS = ('corrupt', 'truncated', 'empty', 'unsupported', 'dimensions', 'nan', 'missing_file',
         'geometry')


class PrepError(ValueError):
  """One input that cannot be converted. ``str(e)`` is one line naming the file; ``e.kind`` is in KINDS."""

  def __init__(self, kind: str, reason: str):
    if kind not in KINDS:
      raise ValueError(f'PrepError kind {kind!r} is not one of {KINDS}')
    # Messages from SimpleITK/ITK span many lines; a reject row must stay one line.
    reason = ' '.join(str(reason).split())
    super().__init__(reason)
    self.kind = kind
    self.reason = reason

  def __reduce__(self):
    # Rebuilt from both fields if a process pool ever ships one back (the default would pass one).
    return type(self), (self.kind, self.reason)


def one_line(e: BaseException, limit: int = 300) -> str:
  """``Type: message`` of a library exception squeezed to one line (ITK messages carry file paths and C++ frames)."""
  text = ' '.join(str(e).split())
  # ITK prefixes long source locations; the useful part is at the end.
  if len(text) > limit:
    text = '...' + text[-limit:]
  return f'{type(e).__name__}: {text}'
