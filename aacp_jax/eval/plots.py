"""Figures for notebooks and reports (matplotlib, Agg backend: no display needed).

Every function returns the Figure and, given `path`, saves it there as a PNG; `note` is a small
footnote (the command, date or commit that made the figure), so a PNG says where it came from.
"""

import math

import matplotlib

matplotlib.use('Agg')  # Before pyplot: headless test machines and batch jobs have no display.

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from aacp_jax import modalities  # noqa: E402
from aacp_jax.eval import metrics  # noqa: E402

_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*', '<', '>')


def _finish(fig, path, note):
  if note:
    fig.text(0.01, 0.005, note, fontsize=7, color='0.4', ha='left', va='bottom')
  fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
  if path:
    fig.savefig(path, dpi=120)
  return fig


def label_efficiency(rows, path=None, metric=None, note: str = ''):
  """One panel per task: metric vs label fraction (percent, log x), one line per method with a
  95 % band. Rows are per-seed rows (value, low, high; `report.Evaluation.rows`) or aggregated
  ones (mean, std; `aggregate.aggregate_seeds`, band = mean +- 1.96 std / sqrt(n_seeds)).
  Several per-seed rows at one point are averaged, their CI ends too (a display, not a test)."""
  rows = list(rows)
  if not rows:
    raise ValueError('label_efficiency: no rows')
  metric = metric or rows[0]['metric']
  rows = [r for r in rows if r['metric'] == metric]
  if not rows:
    raise ValueError(f'label_efficiency: no row has metric {metric!r}')
  tasks = list(dict.fromkeys(r['task'] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for method in dict.fromkeys(r['method'] for r in rows if r['task'] == task):
      pts = {}
      for r in rows:
        if r['task'] == task and r['method'] == method:
          pts.setdefault(float(r['fraction']), []).append(r)
      xs = sorted(pts)
      mid, lo, hi = [], [], []
      for x in xs:
        group = pts[x]
        if 'mean' in group[0]:
          g = group[0]
          half = 1.96 * g['std'] / math.sqrt(g['n_seeds']) if g.get('n_seeds', 1) > 1 else 0.0
          half = 0.0 if not np.isfinite(half) else half
          mid.append(g['mean'])
          lo.append(g['mean'] - half)
          hi.append(g['mean'] + half)
        else:
          mid.append(np.mean([g['value'] for g in group]))
          lo.append(np.mean([g.get('low', g['value']) for g in group]))
          hi.append(np.mean([g.get('high', g['value']) for g in group]))
      (line,) = ax.plot(xs, mid, marker='o', label=str(method))
      ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale('log')
    # Ticks at the fractions drawn, printed as percents (not 5x10^1).
    ticks = sorted({float(r['fraction']) for r in rows if r['task'] == task})
    ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel('labelled fraction (%)')
    ax.set_ylabel(metric)
    ax.set_title(str(task))
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  return _finish(fig, path, note)


def _project(features, method, seed):
  from sklearn.decomposition import PCA  # Lazy: scikit-learn is the `eval` extra.
  from sklearn.manifold import TSNE

  if method == 'pca':
    return PCA(n_components=2, random_state=seed).fit_transform(features)
  if method == 'tsne':
    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(
      features
    )
  raise ValueError(f"embeddings: method must be 'tsne' or 'pca', got {method!r}")


def _scatter_groups(ax, xy, modality, region, mods, regs, size):
  """One scatter per (modality, region): colour by modality, marker by region."""
  colours = plt.get_cmap('tab10')
  for i, m in enumerate(mods):
    for j, r in enumerate(regs):
      sel = (modality == m) & (region == r)
      if sel.any():
        ax.scatter(
          xy[sel, 0],
          xy[sel, 1],
          s=size,
          color=colours(i % 10),
          marker=_MARKERS[j % len(_MARKERS)],
          label=f'{m} / {r}',
          alpha=0.8,
        )


def embeddings(
  features, modality, region, path=None, methods=('tsne', 'pca'), seed: int = 0, note: str = ''
):
  """2-D projections side by side (t-SNE, PCA), colour = modality, marker = region."""
  features = metrics.check_no_nan('embeddings', features)
  modality, region = np.asarray(modality), np.asarray(region)
  if not len(features) == len(modality) == len(region):
    raise ValueError(
      f'embeddings: {len(features)} features, {len(modality)} modalities, {len(region)} regions'
    )
  mods, regs = list(dict.fromkeys(modality.tolist())), list(dict.fromkeys(region.tolist()))
  fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 4.2), squeeze=False)
  for ax, method in zip(axes[0], methods):
    xy = _project(features, method, seed)
    _scatter_groups(ax, xy, modality, region, mods, regs, size=18)
    ax.set_title({'tsne': 't-SNE', 'pca': 'PCA'}[method])
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0][-1].legend(fontsize=7, loc='best', title='modality / region', title_fontsize=7)
  return _finish(fig, path, note)


def _window(image, window):
  image = np.asarray(image, np.float64)
  if image.ndim == 3:
    # Channels (CT's slab, MRI's sequences): the middle one, as a radiologist would scroll to.
    image = image[..., image.shape[-1] // 2]
  if window is None:
    lo, hi = float(image.min()), float(image.max())
  elif isinstance(window, str):
    if window not in modalities.CT_WINDOWS:
      raise ValueError(f'window {window!r}: expected one of {sorted(modalities.CT_WINDOWS)}')
    lo, hi = modalities.CT_WINDOWS[window]
  else:
    lo, hi = map(float, window)
  return np.clip((image - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def _resize(a, shape):
  """Bilinear resize of a 2-D map (edge-aligned), enough for display."""
  a = np.asarray(a, np.float64)
  ys = np.linspace(0, a.shape[0] - 1, shape[0])
  xs = np.linspace(0, a.shape[1] - 1, shape[1])
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, a.shape[0] - 1), np.minimum(x0 + 1, a.shape[1] - 1)
  wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = a[y0][:, x0] * (1 - wx) + a[y0][:, x1] * wx
  bottom = a[y1][:, x0] * (1 - wx) + a[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


def attention_overlay(image, attention, mask=None, path=None, window=None, note: str = ''):
  """Image (H, W[, C]; middle channel shown) windowed (a CT window name or (lo, hi) in HU; None
  = min-max, for X-ray and MRI), the attention map resized over it, the outline of the mask's
  nonzero pixels (label masks: every finding together)."""
  shown = _window(image, window)
  att = _resize(attention, shown.shape)
  fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
  for ax in axes:
    ax.imshow(shown, cmap='gray', vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
  im = axes[1].imshow(att, cmap='jet', alpha=0.45)
  fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
  if mask is not None:
    mask = np.asarray(mask) > 0
    if mask.shape != shown.shape:
      mask = _resize(mask.astype(np.float64), shown.shape) >= 0.5
    if mask.any() and not mask.all():
      for ax in axes:
        ax.contour(mask.astype(float), levels=[0.5], colors='lime', linewidths=1.0)
  axes[0].set_title('image' + (f' ({window})' if isinstance(window, str) else ''))
  axes[1].set_title('attention')
  return _finish(fig, path, note)


def roc_curves(y, scores_by_name: dict, path=None, note: str = ''):
  """Binary ROC curves, one per named score vector (N,), AUROC (`metrics.auroc`) in the legend."""
  y = np.asarray(y).astype(bool)
  fig, ax = plt.subplots(figsize=(4.4, 4.2))
  for name, s in scores_by_name.items():
    s = metrics.check_no_nan(f'roc_curves {name}', s)
    if s.ndim == 2:
      s = s[:, 1]  # (N, 2) protocol scores: column 1 is the positive class.
    order = np.argsort(-s, kind='mergesort')
    ys, ss = y[order], s[order]
    # One point per distinct threshold, so ties move diagonally as AUROC's mid-ranks count them.
    last = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]
    tpr = np.r_[0, np.cumsum(ys)[last] / max(ys.sum(), 1)]
    fpr = np.r_[0, np.cumsum(~ys)[last] / max((~ys).sum(), 1)]
    ax.plot(fpr, tpr, label=f'{name} (AUROC {metrics.auroc(y, s):.3f})')
  ax.plot([0, 1], [0, 1], color='0.6', linestyle='--', linewidth=0.8)
  ax.set_xlabel('false positive rate')
  ax.set_ylabel('true positive rate')
  # A small margin, so the segments along x = 1 and y = 0 are not hidden under the spines.
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.legend(fontsize=8, loc='lower right')
  return _finish(fig, path, note)


def embedding_panels(panels: dict, modality, region, path=None, method='tsne', seed=0, note=''):
  """One 2-D projection per panel (title -> features (N, F), the same N images in each, e.g. one
  encoder at several checkpoints), colour = modality, marker = region (Fig. 2's layout)."""
  modality, region = np.asarray(modality), np.asarray(region)
  mods, regs = list(dict.fromkeys(modality.tolist())), list(dict.fromkeys(region.tolist()))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
  for ax, (title, features) in zip(axes[0], panels.items()):
    features = metrics.check_no_nan(f'embedding_panels {title}', features)
    if len(features) != len(modality) or len(features) != len(region):
      raise ValueError(f'embedding_panels {title}: {len(features)} features for {len(modality)}')
    xy = _project(features, method, seed)
    _scatter_groups(ax, xy, modality, region, mods, regs, size=16)
    ax.set_title(f'{title} ({ {"tsne": "t-SNE", "pca": "PCA"}[method] })', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0][-1].legend(fontsize=7, loc='best', title='modality / region', title_fontsize=7)
  return _finish(fig, path, note)


def attention_grid(images, attentions, titles, path=None, window=None, note: str = ''):
  """Rows of (image, attention over it), one row per example: images (N, H, W[, C]) windowed as
  in `attention_overlay`, attention maps (N, h, w) resized over them."""
  n = len(images)
  fig, axes = plt.subplots(n, 2, figsize=(5.2, 2.6 * n), squeeze=False)
  for i in range(n):
    shown = _window(images[i], window)
    att = _resize(attentions[i], shown.shape)
    for ax in axes[i]:
      ax.imshow(shown, cmap='gray', vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[i][1].imshow(att, cmap='jet', alpha=0.45)
    axes[i][0].set_title(str(titles[i]), fontsize=8)
    axes[i][1].set_title('attention', fontsize=8)
  return _finish(fig, path, note)


def data_needed(needed, path=None, note: str = ''):
  """Per task, a horizontal bar per method: the label fraction (log x) at which it reaches the
  baseline's full-data score (`study.tables.data_needed` rows); methods that never do are
  marked 'not reached' at the largest fraction."""
  needed = list(needed)
  if not needed:
    raise ValueError('data_needed: no rows')
  tasks = list(dict.fromkeys(r['task'] for r in needed))
  fig, axes = plt.subplots(
    1,
    len(tasks),
    figsize=(max(6.0, 4.2 * len(tasks)), 0.5 + 0.45 * len(needed) / len(tasks) + 1.2),
    squeeze=False,
  )
  for ax, task in zip(axes[0], tasks):
    rows = [r for r in needed if r['task'] == task]
    top = max(r['baseline_fraction'] for r in rows)
    ys = np.arange(len(rows))
    for y, r in zip(ys, rows):
      f = r['fraction']
      ax.barh(y, top if f is None else f, color='0.8' if f is None else 'tab:blue', left=0)
      ax.text(
        (top if f is None else f) * 1.05,
        y,
        'not reached' if f is None else f'{f:.3g} %',
        va='center',
        fontsize=7,
      )
    ax.set_yticks(ys, [r['method'] for r in rows], fontsize=8)
    ax.set_xscale('log')
    lo, hi = min([r['fraction'] for r in rows if r['fraction']] + [top]) / 3, top * 4
    ax.set_xlim(lo, hi)
    # Decades as plain percents (0.1, 1, 10, 100), no minor labels crowding the axis.
    ticks = [10.0**k for k in range(-3, 4) if lo <= 10.0**k <= hi]
    ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel('labelled fraction to match (%)')
    ax.set_title(f'{task}: {rows[0]["metric"]} ≥ {rows[0]["target"]:.3f}', fontsize=9)
    ax.invert_yaxis()
  return _finish(fig, path, note)
