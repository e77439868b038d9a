"""Linear probes on frozen features: the standard read-out of self-supervised representations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aacp_jax.eval import embed as embed_lib
from aacp_jax.eval import metrics
from aacp_jax.models import inputs


@functools.partial(jax.jit, static_argnames=('steps',))
def _fit(xs, onehot, l2, steps):
  """L-BFGS on the L2-regularised softmax cross-entropy; one compilation per data shape."""

  def loss(p):
    logits = xs @ p['w'] + p['b']
    return optax.softmax_cross_entropy(logits, onehot).mean() + 0.5 * l2 * jnp.sum(p['w'] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def body(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(params, updates), state), None

  params = {'w': jnp.zeros((xs.shape[1], onehot.shape[1])), 'b': jnp.zeros((onehot.shape[1],))}
  (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
  return params


def fit_logistic(
  x: np.ndarray,
  y: np.ndarray,
  *,
  l2: float = 1e-3,
  steps: int = 300,
  num_classes: int | None = None,
):
  """Multinomial logistic regression, full batch, L-BFGS on standardised features.

  Returns a predict function giving class probabilities. Deterministic (zero init).
  """
  num_classes = int(num_classes or (int(y.max()) + 1))
  mean, std = x.mean(0), x.std(0) + 1e-6
  xs = jnp.asarray((x - mean) / std, jnp.float32)
  onehot = jax.nn.one_hot(jnp.asarray(y), num_classes)
  params = jax.device_get(_fit(xs, onehot, jnp.float32(l2), steps))

  def predict_proba(x_new):
    z = ((x_new - mean) / std) @ params['w'] + params['b']
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)

  return predict_proba


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def choose_l2(x: np.ndarray, y: np.ndarray, *, grid=L2_GRID, folds: int = 4, seed: int = 0):
  """The L2 strength with the best mean cross-validated log-likelihood on the fitting set alone.

  Few labelled examples and many features make an unregularised probe memorise noise; choosing
  the strength on the test set would overstate the result.
  """
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(y))
  fold_of = np.empty(len(y), int)
  fold_of[order] = np.arange(len(y)) % folds
  num_classes = int(y.max()) + 1
  scores = []
  for l2 in grid:
    ll = 0.0
    for k in range(folds):
      tr, va = fold_of != k, fold_of == k
      proba = fit_logistic(x[tr], y[tr], l2=l2, num_classes=num_classes)(x[va])
      ll += np.log(np.clip(proba[np.arange(va.sum()), y[va]], 1e-12, None)).sum()
    scores.append(ll)
  return float(grid[int(np.argmax(scores))])


def linear_probe(
  f_fit, y_fit, f_test, y_test, *, l2: float | None = None, bootstrap: int = 1000, seed: int = 0
) -> dict:
  """AUROC (binary) and accuracy on the test set, each with a 95 % bootstrap CI, and chance.

  `l2=None` picks the regularisation by cross-validation on the fitting set (`choose_l2`).
  """
  if l2 is None:
    l2 = choose_l2(f_fit, y_fit, seed=seed)
  predict = fit_logistic(f_fit, y_fit, l2=l2)
  proba = predict(f_test)
  pred = proba.argmax(1)
  out = {
    'n_fit': int(len(y_fit)),
    'n_test': int(len(y_test)),
    'l2': l2,
    'accuracy': metrics.accuracy(y_test, pred),
    'accuracy_ci': metrics.bootstrap_ci(metrics.accuracy, y_test, pred, n=bootstrap, seed=seed),
    'chance_accuracy': metrics.chance_accuracy(y_fit, y_test),
  }
  if proba.shape[1] == 2:
    out['auroc'] = metrics.auroc(y_test, proba[:, 1])
    out['auroc_ci'] = metrics.bootstrap_ci(
      metrics.auroc, y_test, proba[:, 1], n=bootstrap, seed=seed
    )
    out['chance_auroc'] = 0.5
  return out


def evaluate_pretrained(config, model, state, root) -> dict:
  """Per modality: probe the pretrained encoder and, beside it, the same encoder at init."""
  # Embedding runs on the default device: probe sets are small.
  image_size = config.data.image_size
  init_vars = model.init(
    jax.random.key(config.seed), inputs.dummy_inputs(config.modalities, image_size), train=False
  )
  trained_vars = jax.device_get(state.variables)
  results = {}
  for m in config.modalities:
    fit = embed_lib.load_split(root, config.eval.split_fit, m, image_size, aug_cfg=config.augment)
    test = embed_lib.load_split(root, config.eval.split_test, m, image_size, aug_cfg=config.augment)
    row = {}
    for name, variables in (('pretrained', trained_vars), ('random_init', init_vars)):
      f_fit, f_test = (
        embed_lib.embed(
          model, variables, d['image'], m, config.augment, batch_size=config.eval.batch_size
        )
        for d in (fit, test)
      )
      row[name] = linear_probe(
        f_fit,
        fit['label'],
        f_test,
        test['label'],
        l2=config.eval.l2 or None,
        bootstrap=config.eval.bootstrap,
        seed=config.seed,
      )
    results[m] = row
  return results


def format_table(results: dict) -> str:
  """A short text table of probe results for the terminal."""
  lines = [f'{"modality":<8} {"encoder":<12} {"AUROC [95% CI]":<24} {"acc":>6} {"chance":>7}']
  for m, row in results.items():
    for name, r in row.items():
      lo, hi = r.get('auroc_ci', (float('nan'),) * 2)
      lines.append(
        f'{m:<8} {name:<12} {r.get("auroc", float("nan")):.3f} [{lo:.3f}, {hi:.3f}]'
        f'{"":<4} {r["accuracy"]:>6.3f} {r["chance_accuracy"]:>7.3f}'
      )
  return '\n'.join(lines)
