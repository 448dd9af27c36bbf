"""AU F1 against sklearn (pooled counts, uncoded frames excluded, fold means) and the
weighted asymmetric loss against a torch reference of its formula (margin, focusing,
falling gradient for confident negatives, ME-GraphAU's special case)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

import jax
import jax.numpy as jnp

from emo_jax.train import au_loss, au_metrics


def _labels_preds(seed, n=300, k=6):
  rng = np.random.default_rng(seed)
  labels = (rng.uniform(size=(n, k)) < rng.uniform(0.05, 0.6, size=k)).astype(np.int8)
  scores = np.clip(labels * 0.4 + rng.uniform(size=(n, k)) * 0.7, 0, 1)
  labels[rng.uniform(size=(n, k)) < 0.15] = -1
  labels[:, -1] = np.where(labels[:, -1] >= 0, 0, -1)    # an AU that never occurs
  return labels, scores


def test_f1_matches_sklearn_with_uncoded_excluded_and_pooled():
  labels, scores = _labels_preds(0)
  pred = au_metrics.predictions(scores)
  c = au_metrics.counts(pred, labels)
  f1 = au_metrics.f1_per_au(c)
  for i in range(labels.shape[1]):
    m = labels[:, i] >= 0
    want = f1_score(labels[m, i], pred[m, i], zero_division=0)
    assert f1[i] == pytest.approx(want, abs=1e-12), i
  # Counts pooled over batches = counts over the fold.
  halves = au_metrics.counts(pred[:120], labels[:120]) + au_metrics.counts(pred[120:], labels[120:])
  np.testing.assert_array_equal(au_metrics.f1_per_au(halves), f1)
  # Marking uncoded as negative would change the score.
  wrong = au_metrics.f1_per_au(au_metrics.counts(pred, np.maximum(labels, 0)))
  assert not np.allclose(wrong, f1)
  # Threshold 0.5 on probabilities == logit >= 0.
  logits = np.log(np.clip(scores, 1e-6, 1 - 1e-6) / np.clip(1 - scores, 1e-6, 1))
  np.testing.assert_array_equal(au_metrics.predictions(logits, from_logits=True), pred)


def test_report_mean_over_folds_and_all_positive_baseline():
  folds, means = {}, []
  aus = (1, 2, 4, 6, 12, 26)
  for k in (1, 2, 3):
    labels, scores = _labels_preds(k)
    pred = au_metrics.predictions(scores)
    folds[k] = au_metrics.counts(pred, labels)
    per = [f1_score(labels[labels[:, i] >= 0, i], pred[labels[:, i] >= 0, i], zero_division=0)
           for i in range(len(aus))]
    means.append(np.mean(per))
    base = [f1_score(labels[labels[:, i] >= 0, i], np.ones((labels[:, i] >= 0).sum()),
                     zero_division=0) for i in range(len(aus))]
    np.testing.assert_allclose(au_metrics.all_positive_f1(folds[k]), base, atol=1e-12)
  rep = au_metrics.report(folds, aus)
  assert rep["mean_f1"] == pytest.approx(np.mean(means), abs=1e-12)
  assert [rep["folds"][str(k)]["mean_f1"] for k in (1, 2, 3)] == pytest.approx(means, abs=1e-12)
  md = au_metrics.markdown(rep)
  assert "| mean |" in md and "AU26" in md


def _torch_reference(logits, labels, weights, margin, gp, gn, detach):
  z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  y = torch.tensor(labels, dtype=torch.float64)
  coded = (y >= 0).double()
  p = torch.sigmoid(z)
  pm = (p - margin).clamp(min=0) if margin > 0 else p
  fp = (1 - p) ** gp
  fn = pm ** gn
  if detach:
    fp, fn = fp.detach(), fn.detach()
  loss = -(y.clamp(min=0) * fp * torch.log(p.clamp(min=1e-8))
           + (1 - y.clamp(min=0)) * fn * torch.log((1 - pm).clamp(min=1e-8)))
  loss = (loss * coded * torch.tensor(weights, dtype=torch.float64)).sum()
  loss.backward()
  return loss.item(), z.grad.numpy()


def _jax(logits, labels, weights, cfg):
  f = lambda z: au_loss.au_loss_sum(z, jnp.asarray(labels), jnp.asarray(weights), cfg)[0]
  v, g = jax.value_and_grad(f)(jnp.asarray(logits, jnp.float32))
  return float(v), np.asarray(g)


@pytest.mark.parametrize("margin,gp,gn,detach", [(0.05, 0.0, 2.0, False), (0.05, 1.0, 4.0, True),
                                                 (0.0, 0.0, 1.0, True), (0.2, 0.5, 3.0, False)])
def test_loss_matches_torch_reference(margin, gp, gn, detach):
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2.5, size=(16, 5))
  labels = rng.integers(-1, 2, size=(16, 5)).astype(np.int8)
  weights = rng.uniform(0.3, 2.0, size=5)
  cfg = au_loss.AULossConfig(margin=margin, gamma_pos=gp, gamma_neg=gn, detach_focus=detach)
  want_v, want_g = _torch_reference(logits, labels, weights, margin, gp, gn, detach)
  got_v, got_g = _jax(logits, labels, weights, cfg)
  assert got_v == pytest.approx(want_v, rel=1e-5)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)
  assert np.all(got_g[labels < 0] == 0)                  # uncoded entries: no gradient
  _, count = au_loss.au_loss_sum(jnp.asarray(logits), jnp.asarray(labels), None, cfg)
  assert float(count) == (labels >= 0).sum()


def test_megraphau_special_case():
  """m = 0, g+ = 0, g- = 1 with a detached focus is ME-GraphAU's WeightedAsymmetricLoss:
  -sum w [y log p + (1 - y) sg(p) log(1 - p)]."""
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(8, 4))
  labels = rng.integers(0, 2, size=(8, 4))
  w = rng.uniform(0.5, 1.5, size=4)
  z = torch.tensor(logits, requires_grad=True)
  p = torch.sigmoid(z)
  y = torch.tensor(labels, dtype=torch.float64)
  ref = -(torch.tensor(w) * (y * torch.log(p) + (1 - y) * p.detach() * torch.log(1 - p))).sum()
  ref.backward()
  cfg = au_loss.AULossConfig(margin=0.0, gamma_pos=0.0, gamma_neg=1.0, detach_focus=True)
  v, g = _jax(logits, labels, w, cfg)
  assert v == pytest.approx(ref.item(), rel=1e-5)
  np.testing.assert_allclose(g, z.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("detach", [False, True])
def test_negative_gradient_ignores_easy_peaks_and_falls(detach):
  cfg = au_loss.AULossConfig(margin=0.05, gamma_neg=2.0, detach_focus=detach)
  p = np.concatenate([np.linspace(0.001, 0.05, 20), np.linspace(0.06, 0.9999, 400)])
  z = np.log(p / (1 - p))
  _, g = _jax(z[:, None], np.zeros((len(p), 1), np.int8), np.ones(1), cfg)
  g = g[:, 0]
  assert np.all(g[p <= 0.05] == 0)                       # easy negatives: ignored
  assert np.all(g[p > 0.06] > 0)
  peak = int(np.argmax(g))
  assert 0.5 < p[peak] < 0.99                             # rises, peaks inside (0, 1)
  assert np.all(np.diff(g[p > p[peak]]) <= 1e-7)          # then falls monotonically
  assert g[-1] < 0.05 * g[peak]                           # confident "negatives" discarded


def test_deep_supervision_adds_mean_layer_loss():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  deep = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(-1, 2, size=(4, 3)), jnp.int8)
  cfg = au_loss.AULossConfig(deep_supervision_weight=0.3)
  total, n = au_loss.deep_supervised_sum(logits, deep, labels, None, cfg)
  want = au_loss.au_loss_sum(logits, labels, None, cfg)[0] + 0.3 * 0.5 * (
      au_loss.au_loss_sum(deep[0], labels, None, cfg)[0]
      + au_loss.au_loss_sum(deep[1], labels, None, cfg)[0])
  assert float(total) == pytest.approx(float(want), rel=1e-6)
  assert float(n) == float((labels >= 0).sum())
