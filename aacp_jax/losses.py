"""Pre-training losses (paper 3.2.1, 3.2.4): pure functions of global arrays, float32 math.

No axis names: under jit with batch-sharded inputs the similarity matrices span the global batch,
which is what gives global negatives.
"""
import jax
import jax.numpy as jnp


def _safe_norm(sq):
  # sqrt with a finite gradient at 0 (identical points) and the exact value elsewhere.
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _two_view_logits(z1, z2, temperature):
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
  n = z.shape[0]
  logits = z @ z.T / jnp.float32(temperature)
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
    log_w = jnp.zeros((n, n), jnp.float32)
  else:
    w = jnp.asarray(neg_weights, jnp.float32)
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
  c = jnp.asarray(c, jnp.float32)
  vis = jnp.asarray(visible, jnp.float32)
  diff = c[:, None] - c[None, :]  # (B, B, K, 2)
  dist = _safe_norm(jnp.sum(diff * diff, axis=-1))
  both = vis[:, None] * vis[None, :]
  count = jnp.sum(both, axis=-1)
  d = jnp.sum(dist * both, axis=-1) / jnp.maximum(count, 1.0)
  w = 1.0 - jnp.float32(gamma) * jnp.exp(-(d * d) / jnp.float32(sigma) ** 2)
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
  pred = jnp.asarray(pred_aug, jnp.float32)
  ref = jnp.asarray(ref, jnp.float32)
  a_inv = jnp.asarray(affine_inv, jnp.float32)
  vis = jnp.asarray(visible_aug, bool) & jnp.asarray(ref_visible, bool)
  v_pred = pred[:, None, :, :] - pred[:, :, None, :]  # [b, i, j] = p_j - p_i
  v_ref = ref[:, None, :, :] - ref[:, :, None, :]
  v_back = jnp.einsum('bcd,bijd->bijc', a_inv, v_pred)
  err = jnp.sum((v_ref - v_back) ** 2, axis=-1)
  k = pred.shape[1]
  upper = jnp.triu(jnp.ones((k, k), bool), 1)
  pairs = (vis[:, :, None] & vis[:, None, :] & upper).astype(jnp.float32)
  n_pairs = jnp.sum(pairs, axis=(1, 2))
  per_sample = jnp.sum(err * pairs, axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
  has = (n_pairs > 0).astype(jnp.float32)
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
  a = jnp.asarray(anchor, jnp.float32)
  p = jnp.asarray(positive, jnp.float32)
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
  return jnp.mean(jnp.maximum(d_ap - d_an + jnp.float32(margin), 0.0))
