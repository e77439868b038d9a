"""The one error type of the preprocessing ops: a kind the runner can count and a one-line reason."""

from __future__ import annotations

import functools

from aacp_jax import errors

# The runner's reject vocabulary (docs/INTERFACES.md, "Prep runner"), plus 'geometry' for slice
# positions that do not form one regular grid: a reject list is only useful if its kinds can be counted.
# 'not_a_file' (a directory or device where a file was named), 'decompression_bomb' (an image
# whose header declares more pixels than any radiograph has) and 'unstripped' (a head where a
# skull-stripped brain was promised) say what happened where a catch-all kind would mislead.
KINDS = (
  'corrupt',
  'truncated',
  'empty',
  'unsupported',
  'dimensions',
  'nan',
  'missing_file',
  'geometry',
  'not_a_file',
  'decompression_bomb',
  'unstripped',
)


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


# ``Type: message`` of a library exception on one line: ITK prefixes long source locations and
# C++ frames, so the useful part is at the end; the type disambiguates terse library messages.
one_line = functools.partial(errors.one_line, keep='tail', with_type=True)
