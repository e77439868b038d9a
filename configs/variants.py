"""Named config variants shared by every config file: `file.py:demo,no_roi` applies them in order."""


class Variants(dict):
  """name -> function editing a ConfigDict in place; `register` is the decorator."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def register(self, fn):
    self[fn.__name__] = fn
    return fn

  def apply(self, config, arg):
    """Applies the comma-separated variants of `arg` to `config`; records them in `config.variant`.

    An unknown name fails with one line listing every known variant.
    """
    names = [n.strip() for n in (arg or '').split(',') if n.strip()]
    for name in names:
      if name not in self:
        raise ValueError(f'{self.path}: unknown variant {name!r}; known: {", ".join(sorted(self))}')
      self[name](config)
    config.variant = ','.join(names)
    return config
