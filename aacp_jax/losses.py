"""Pre-training losses (paper 3.2.1, 3.2.4): pure functions of global arrays, float32 math.

No axis names: under jit with batch-sharded inputs the similarity matrices span the global batch,
which is what gives global negatives.
"""

import jax
import jax.numpy as jnp

from aacp_jax import precision


def _safe_norm(sq):
  # sqrt with a finite gradient at 0 (identical points) and the exact value elsewhere.
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _two_view_logits(z1, z2, temperature):
  z = jnp.concatenate([z1, z2], axis=0).astype(precision.real())
  n = z.shape[0]
  logits = z @ z.T / precision.real()(temperature)
  pos = (jnp.arange(n) + n // 2) % n  # row i's other view
  return logits, pos


def info_nce(z1, z2, temperature, neg_weights=None):
  """NT-Xent (SimCLR) over the 2B embeddings of both views, with optional negative weights.

  z = [z1; z2] (2B, D), assumed L2-normalised (not re-normalised here); s_ik = z_i . z_k / tau;
  p(i) = i + B mod 2B is row i's positive. With weights w (2B, 2B) on the negatives,

    L = 1/(2B) sum_i [ -s_{i p(i)} + log( exp(s_{i p(i)}) + sum_{k != i, p(i)} w_ik exp(s_ik) ) ],

  computed as a log-sum-exp over s_ik + log w_ik (w_{i p(i)} := 1, w_ii := 0, w = 0 excluded).
  neg_weights=None is w = 1: plain NT-Xent, equal to half of simclr tf2 `add_contrastive_loss`
  (which sums the two views' mean cross-entropies).
  """
  logits, pos = _two_view_logits(z1, z2, temperature)
  n = logits.shape[0]
  eye = jnp.eye(n, dtype=bool)
  is_pos = jnp.arange(n)[None, :] == pos[:, None]
  if neg_weights is None:
    log_w = jnp.zeros((n, n), precision.real())
  else:
    w = jnp.asarray(neg_weights, precision.real())
    log_w = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
  log_w = jnp.where(is_pos, 0.0, log_w)
  masked = jnp.where(eye, -jnp.inf, logits + log_w)
  pos_logit = jnp.take_along_axis(logits, pos[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(masked, axis=1) - pos_logit)


def structure_neg_weights(c, visible, gamma, sigma):
  """Structure-aware negative weights for `info_nce`, (2B, 2B) in the [view 1; view 2] layout.

  c (B, K, 2) canonical landmarks, visible (B, K). For samples i, k with S_ik the landmarks
  visible in both: d_ik = mean_{l in S_ik} ||c_il - c_kl||_2 and

    w_ik = 1 - gamma * exp(-d_ik^2 / sigma^2)      (w_ik = 1 when S_ik is empty),

  so anatomically similar negatives (same structure, small d) are pushed away less. Both views of
  a sample share c, so the matrix is [[W, W], [W, W]]; the positive and self entries are ignored by
  `info_nce`. gamma = 0 gives all ones (plain InfoNCE).
  """
  c = jnp.asarray(c, precision.real())
  vis = jnp.asarray(visible, precision.real())
  diff = c[:, None] - c[None, :]  # (B, B, K, 2)
  dist = _safe_norm(jnp.sum(diff * diff, axis=-1))
  both = vis[:, None] * vis[None, :]
  count = jnp.sum(both, axis=-1)
  d = jnp.sum(dist * both, axis=-1) / jnp.maximum(count, 1.0)
  w = 1.0 - precision.real()(gamma) * jnp.exp(-(d * d) / precision.real()(sigma) ** 2)
  w = jnp.where(count > 0, w, 1.0)
  return jnp.tile(w, (2, 2))


def spatial_consistency(pred_aug, visible_aug, ref, ref_visible, affine_inv):
  """Spatial consistency (paper 3.2.1 as read in ARCHITECTURE.md).

  pred_aug (B, K, 2): landmark head on the augmented view (augmented frame, normalised (y, x));
  ref (B, K, 2): frozen detector on the original; affine_inv (B, 2, 2): linear part of the inverse
  spatial transform (augmented-frame vectors -> original frame, i.e. inv of `augment`'s `linear`).
  With v_ij(p) = p_j - p_i and P_b the pairs i < j visible in both views of sample b:

    L_b = 1/|P_b| sum_{(i,j) in P_b} || v_ij(ref_b) - A_b^-1 v_ij(pred_b) ||^2,
    L = mean of L_b over samples with |P_b| > 0   (0 if none).

  Vectors make translations cancel; it is 0 for equivariant predictions pred = A ref + t.
  Per-sample normalisation by |P_b| keeps samples with few visible landmarks from being drowned.
  """
  pred = jnp.asarray(pred_aug, precision.real())
  ref = jnp.asarray(ref, precision.real())
  a_inv = jnp.asarray(affine_inv, precision.real())
  vis = jnp.asarray(visible_aug, bool) & jnp.asarray(ref_visible, bool)
  v_pred = pred[:, None, :, :] - pred[:, :, None, :]  # [b, i, j] = p_j - p_i
  v_ref = ref[:, None, :, :] - ref[:, :, None, :]
  v_back = jnp.einsum('bcd,bijd->bijc', a_inv, v_pred)
  err = jnp.sum((v_ref - v_back) ** 2, axis=-1)
  k = pred.shape[1]
  upper = jnp.triu(jnp.ones((k, k), bool), 1)
  pairs = (vis[:, :, None] & vis[:, None, :] & upper).astype(precision.real())
  n_pairs = jnp.sum(pairs, axis=(1, 2))
  per_sample = jnp.sum(err * pairs, axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
  has = (n_pairs > 0).astype(precision.real())
  return jnp.sum(per_sample * has) / jnp.maximum(jnp.sum(has), 1.0)


def _pairwise_dist(x, y):
  return _safe_norm(jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1))


def triplet(anchor, positive, margin, mining='hardest'):
  """Triplet loss over the global batch with in-batch negative mining.

  anchor = view 1, positive = view 2 (B, D); d = Euclidean distance. For anchor i the negatives
  are every other sample's anchor and positive: N_i = {a_k, p_k : k != i}.

    L = 1/B sum_i max(0, d(a_i, p_i) - d(a_i, n_i) + margin)

  mining='hardest': n_i = argmin_{n in N_i} d(a_i, n).
  mining='semihard' (FaceNet; tfa triplet_semihard_loss): n_i = the closest negative farther than
  the positive, d(a_i, n) > d(a_i, p_i); if none is, the farthest negative.
  """
  a = jnp.asarray(anchor, precision.real())
  p = jnp.asarray(positive, precision.real())
  b = a.shape[0]
  d_ap = _safe_norm(jnp.sum((a - p) ** 2, axis=-1))
  d_neg = jnp.concatenate([_pairwise_dist(a, a), _pairwise_dist(a, p)], axis=1)  # (B, 2B)
  not_self = ~jnp.tile(jnp.eye(b, dtype=bool), (1, 2))
  if mining == 'hardest':
    d_an = jnp.min(jnp.where(not_self, d_neg, jnp.inf), axis=1)
  elif mining == 'semihard':
    outside = not_self & (d_neg > d_ap[:, None])
    closest_outside = jnp.min(jnp.where(outside, d_neg, jnp.inf), axis=1)
    farthest = jnp.max(jnp.where(not_self, d_neg, -jnp.inf), axis=1)
    d_an = jnp.where(jnp.any(outside, axis=1), closest_outside, farthest)
  else:
    raise ValueError(f"mining must be 'hardest' or 'semihard', got {mining!r}")
  return jnp.mean(jnp.maximum(d_ap - d_an + precision.real()(margin), 0.0))


def multiscale_info_nce(levels1, levels2, weights, temperature, neg_weights=None):
  """Multi-scale contrast (paper 3.2.3): `info_nce` on each pyramid level, weighted sum.

  levels1, levels2: sequences of L (B, D_l) normalised level embeddings of view 1 / view 2;
  weights: L non-negative floats (a 0 weight skips its level). With L_l = info_nce(level l),

    L_ms = sum_l w_l L_l.

  Returns (L_ms, [L_l for every level]); skipped levels report 0.
  """
  if not len(levels1) == len(levels2) == len(weights):
    raise ValueError(
      f'multiscale_info_nce: {len(levels1)} / {len(levels2)} levels, {len(weights)} weights'
    )
  total = precision.real()(0.0)
  per_level = []
  for z1, z2, w in zip(levels1, levels2, weights):
    if float(w) == 0:
      per_level.append(precision.real()(0.0))
      continue
    l = info_nce(z1, z2, temperature, neg_weights)
    per_level.append(l)
    total = total + precision.real()(w) * l
  return total, per_level


def cross_modal_pairs(
  canonical,
  visible,
  organs,
  modality_ids,
  delta,
  *,
  landmark_mask=None,
  min_common=1,
  organ_weight=0.5,
):
  """Pseudo-positive weights between samples of different modalities (paper 3.3.3), (N, N).

  canonical (N, K, 2) landmarks in the canonical frontal frame, visible (N, K), organs (N, O)
  multi-hot, modality_ids (N,) ints; landmark_mask (K,) bool = the named landmark set (None: all).
  For i, j with m_i != m_j let C_ij = named landmarks visible in both. Then

    landmark pair  <=>  |C_ij| >= min_common  and  ||c_il - c_jl||_2 < delta for EVERY l in C_ij,
    organ pair     <=>  organs_i . organs_j > 0  (at least one organ label in common),

    P_ij = 1 for a landmark pair, else organ_weight (0.5) for an organ pair, else 0;  P_ij = 0
    whenever m_i == m_j (no pairs within one modality, the within-modality term owns those).

  "Every commonly visible landmark within delta" reads the paper's "contain landmarks ...
  within similar normalised coordinates (distance < 0.15)" as all of them, not any one.
  """
  c = jnp.asarray(canonical, precision.real())
  vis = jnp.asarray(visible, bool)
  if landmark_mask is not None:
    vis = vis & jnp.asarray(landmark_mask, bool)[None, :]
  common = vis[:, None, :] & vis[None, :, :]  # (N, N, K)
  dist = _safe_norm(jnp.sum((c[:, None] - c[None, :]) ** 2, axis=-1))
  n_common = jnp.sum(common, axis=-1)
  all_close = jnp.all(~common | (dist < precision.real()(delta)), axis=-1)
  mod = jnp.asarray(modality_ids)
  other = mod[:, None] != mod[None, :]
  landmark_pair = other & (n_common >= min_common) & all_close
  org = jnp.asarray(organs, precision.real())
  organ_pair = other & ((org @ org.T) > 0)
  return jnp.where(
    landmark_pair, 1.0, jnp.where(organ_pair, precision.real()(organ_weight), 0.0)
  ).astype(precision.real())


def cross_modal_info_nce(z, modality_ids, pair_weights, temperature):
  """InfoNCE over cross-modal candidates with weighted pseudo-positives.

  z (N, D) normalised embeddings of all modalities in the shared space, modality_ids (N,),
  pair_weights P (N, N) from `cross_modal_pairs`. s_ij = z_i . z_j / tau; candidates of anchor i
  are the samples of the other modalities, X_i = {j : m_j != m_i}; positives Pos_i = {j : P_ij > 0}:

    log p_ij = s_ij - log sum_{k in X_i} exp(s_ik),
    L_i = -1/|Pos_i| sum_{j in Pos_i} P_ij log p_ij,
    L = mean of L_i over anchors with |Pos_i| > 0   (0 if there is none).

  Dividing by the count (not by sum P) keeps an organ-only pair at half the weight of a
  landmark pair, the paper's "0.5x the standard positive pair loss contribution".
  """
  z = jnp.asarray(z, precision.real())
  p = jnp.asarray(pair_weights, precision.real())
  mod = jnp.asarray(modality_ids)
  logits = z @ z.T / precision.real()(temperature)
  cand = mod[:, None] != mod[None, :]
  lse = jax.nn.logsumexp(jnp.where(cand, logits, -jnp.inf), axis=1, keepdims=True)
  # Rows without candidates (one modality only) have lse = -inf; they have no positives either.
  log_p = jnp.where(cand, logits - jnp.where(jnp.isfinite(lse), lse, 0.0), 0.0)
  pos = (p > 0) & cand
  n_pos = jnp.sum(pos, axis=1).astype(precision.real())
  per_anchor = -jnp.sum(jnp.where(pos, p * log_p, 0.0), axis=1) / jnp.maximum(n_pos, 1.0)
  has = (n_pos > 0).astype(precision.real())
  return jnp.sum(per_anchor * has) / jnp.maximum(jnp.sum(has), 1.0)


def curriculum_weight(epoch, start, end, peak):
  """lambda_cross(epoch) (paper 3.3.3): 0 before `start`, linear to `peak` at `end`, then `peak`.

    lambda(e) = peak * clip((e - start) / (end - start), 0, 1);   end == start: a step at start.

  Works on Python floats and traced arrays alike.
  """
  if end <= start:
    return jnp.where(jnp.asarray(epoch) >= start, precision.real()(peak), precision.real()(0.0))
  frac = jnp.clip((jnp.asarray(epoch, precision.real()) - start) / (end - start), 0.0, 1.0)
  return precision.real()(peak) * frac
