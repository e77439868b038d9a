"""Named config variants and `key=value` settings shared by every config file.

`file.py:demo,no_roi` applies the named variants in order; `file.py:demo,method=aacp` also sets
`config.method`; dotted keys reach nested fields (`file.py:demo,optim.lr=3e-4`). A value is read
as a Python literal of the field's current type where it parses (numbers, booleans, tuples),
and as a string otherwise (paths, names).
"""

import ast


class Variants(dict):
  """name -> function editing a ConfigDict in place; `register` is the decorator."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def register(self, fn):
    self[fn.__name__] = fn
    return fn

  def apply(self, config, arg):
    """Applies the comma-separated variants and `key=value` settings of `arg` to `config`, in
    order; records them in `config.variant`.

    An unknown variant fails with one line listing every known variant; an unknown key or a
    value of the wrong type with one line naming the key.
    """
    names = [n.strip() for n in _split(arg or '') if n.strip()]
    for name in names:
      if '=' in name:
        key, value = (part.strip() for part in name.split('=', 1))
        set_value(config, key, value, self.path)
        continue
      if name not in self:
        raise ValueError(f'{self.path}: unknown variant {name!r}; known: {", ".join(sorted(self))}')
      self[name](config)
    config.variant = ','.join(names)
    return config


def _split(arg: str):
  """Commas outside brackets separate items, so `model.projector=(32,32,16)` stays one."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(arg):
    depth += ch in '([{'
    depth -= ch in ')]}'
    if ch == ',' and depth == 0:
      items.append(arg[start:i])
      start = i + 1
  items.append(arg[start:])
  return items


def set_value(config, key: str, text: str, path: str = 'config') -> None:
  """config.<key> = text parsed to the field's type (see the module docstring)."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    if part not in node:
      raise ValueError(f'{path}: {key}={text}: config has no key {part!r}')
    node = node[part]
  if leaf not in node:
    raise ValueError(f'{path}: {key}={text}: config has no key {key!r}')
  old = node[leaf]
  if isinstance(old, str):
    value = text
  else:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ValueError(f'{path}: {key}={text}: expected a {type(old).__name__}') from None
    if isinstance(old, bool) != isinstance(value, bool) or (
      isinstance(old, (int, float)) and not isinstance(value, (int, float))
    ):
      raise ValueError(f'{path}: {key}={text}: expected a {type(old).__name__}')
    if isinstance(old, float):
      value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
  node[leaf] = value
