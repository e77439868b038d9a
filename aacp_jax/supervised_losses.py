"""Fine-tuning losses: pure functions of global arrays, float32 scalars (float64 under x64).

No axis names: under jit with batch-sharded inputs the means span the global batch.
"""

import jax
import jax.numpy as jnp

from aacp_jax import precision

POLICIES = ('ignore', 'zeros', 'ones')
REGRESSION = ('l1', 'mse', 'huber')


def _real(x):
  return jnp.asarray(x, precision.real())


def softmax_cross_entropy(logits, labels, weights=None):
  """Mean softmax cross-entropy of logits (B, C) against class ids labels (B,).

    l_b = logsumexp_c(s_bc) - s_{b,y_b};   L = sum_b w_b l_b / sum_b w_b   (w = 1 if None),

  i.e. the weighted mean over the examples with w_b > 0 (0 when every weight is 0).
  """
  logits = _real(logits)
  labels = jnp.asarray(labels, jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  if weights is None:
    return jnp.mean(nll)
  w = _real(weights)
  nll = jnp.where(w > 0, nll, 0.0)  # a masked-out row's NaN (bad label) must not leak in
  return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), jnp.finfo(w.dtype).tiny)


def multilabel_bce(logits, labels, policy='ignore'):
  """Mean binary cross-entropy of logits (B, L) against labels (B, L) in {-1, 0, 1}.

  CheXpert's uncertain label -1 follows `policy`: 'ignore' (U-Ignore: masked out), 'zeros'
  (U-Zeros: y = 0) or 'ones' (U-Ones: y = 1). With m_bl = 1 for counted entries,

    l_bl = softplus(s_bl) - y_bl s_bl   (= -y log sigma(s) - (1 - y) log(1 - sigma(s))),
    L = sum m_bl l_bl / sum m_bl          (0 when nothing is counted).
  """
  if policy not in POLICIES:
    raise ValueError(f'policy={policy!r}: expected one of {POLICIES}')
  logits = _real(logits)
  labels = jnp.asarray(labels)
  uncertain = labels == -1
  if policy == 'ignore':
    counted, y = ~uncertain, jnp.where(uncertain, 0.0, labels)
  else:
    counted = jnp.ones(labels.shape, bool)
    y = jnp.where(uncertain, 1.0 if policy == 'ones' else 0.0, labels)
  y = _real(y)
  loss = jax.nn.softplus(logits) - y * logits
  m = counted.astype(logits.dtype)
  return jnp.sum(m * loss) / jnp.maximum(jnp.sum(m), 1.0)


def regression_loss(pred, target, kind='l1', delta=1.0):
  """Mean regression loss of pred (B,) against target (B,), r = pred - target:

  l1: |r|;   mse: r^2;   huber: r^2 / 2 if |r| <= delta else delta (|r| - delta / 2).
  """
  if kind not in REGRESSION:
    raise ValueError(f'kind={kind!r}: expected one of {REGRESSION}')
  r = _real(pred) - _real(target)
  if kind == 'l1':
    return jnp.mean(jnp.abs(r))
  if kind == 'mse':
    return jnp.mean(jnp.square(r))
  a = jnp.abs(r)
  return jnp.mean(jnp.where(a <= delta, 0.5 * jnp.square(r), delta * (a - 0.5 * delta)))


def segmentation_loss(logits, mask, dice_weight=1.0, eps=1.0):
  """Pixel softmax cross-entropy plus soft Dice of logits (B, H, W, C) against mask (B, H, W) ids.

  p = softmax(logits) per pixel, y = one_hot(mask, C); sums run over the whole batch, per class:

    seg_ce   = mean_{b,h,w} [ logsumexp_c s - s_{mask} ],
    Dice_c   = (2 sum p_c y_c + eps) / (sum p_c + sum y_c + eps),
    seg_dice = 1 - mean_{c = 1..C-1} Dice_c   (foreground classes; 0 when C = 1),
    loss     = seg_ce + dice_weight * seg_dice.

  Returns (loss, {'seg_ce', 'seg_dice'}).
  """
  logits = _real(logits)
  c = logits.shape[-1]
  mask = jnp.asarray(mask, jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  y = jax.nn.one_hot(mask, c, dtype=logits.dtype)
  ce = -jnp.mean(jnp.sum(y * logp, axis=-1))
  if c > 1:
    p = jnp.exp(logp)
    axes = tuple(range(logits.ndim - 1))
    inter = jnp.sum(p * y, axis=axes)[1:]
    total = jnp.sum(p, axis=axes)[1:] + jnp.sum(y, axis=axes)[1:]
    dice = 1.0 - jnp.mean((2.0 * inter + eps) / (total + eps))
  else:
    dice = jnp.zeros((), logits.dtype)
  return ce + dice_weight * dice, {'seg_ce': ce, 'seg_dice': dice}
