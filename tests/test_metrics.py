"""UAR / WAR against hand computation, and answer -> class parsing."""
import numpy as np
import pytest

from emo_jax.train import metrics

RAF = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


def test_uar_war_fixed_confusion_matrix():
  # 3 classes. Rows: true; columns: predicted (+ unparsed).
  #   class 0: 8 right, 2 -> class 1         recall 8/10
  #   class 1: 3 right, 1 -> class 2, 1 unp.  recall 3/5
  #   class 2: 1 right, 1 -> class 0          recall 1/2
  y_true = [0] * 10 + [1] * 5 + [2] * 2
  y_pred = [0] * 8 + [1] * 2 + [1] * 3 + [2, -1] + [2, 0]
  cm = metrics.confusion_matrix(y_true, y_pred, 3)
  np.testing.assert_array_equal(cm, [[8, 2, 0, 0], [0, 3, 1, 1], [1, 0, 1, 0]])
  assert metrics.war(cm) == pytest.approx((8 + 3 + 1) / 17)
  assert metrics.uar(cm) == pytest.approx((0.8 + 0.6 + 0.5) / 3)
  s = metrics.score(y_true, y_pred, ("a", "b", "c"))
  assert s.num_unparsed == 1 and s.num_samples == 17
  assert s.to_json()["per_class_recall"]["b"] == pytest.approx(0.6)


def test_uar_skips_classes_without_samples_and_out_of_range_is_wrong():
  cm = metrics.confusion_matrix([0, 0, 2], [0, 7, 2], 3)   # 7 is out of range -> unparsed
  assert cm[0, 3] == 1
  assert metrics.uar(cm) == pytest.approx((0.5 + 1.0) / 2)   # class 1 has no samples
  with pytest.raises(ValueError, match="true labels"):
    metrics.confusion_matrix([3], [0], 3)


def test_mean_over_folds():
  a = metrics.score([0, 1], [0, 1], ("x", "y"))
  b = metrics.score([0, 1, 1, 1], [0, 0, 0, 1], ("x", "y"))
  m = metrics.mean_over_folds([a, b])
  assert m["war"] == pytest.approx((1.0 + 0.5) / 2)
  assert m["uar"] == pytest.approx((1.0 + (1 + 1 / 3) / 2) / 2)


@pytest.mark.parametrize("text,want", [
    ("surprise", "surprise"),
    ("Happiness.", "happiness"),
    ("The person looks HAPPY!", "happiness"),            # synonym + casing + punctuation
    ("I think she is angry, not sad.", "anger"),         # first option named wins
    ("joy", "happiness"),
    ("Scared; maybe surprised", "fear"),
    ("neutral", "neutral"),
    ("a cat sitting on a mat", None),                    # no match
    ("", None),
])
def test_parse_answer(text, want):
  got = metrics.parse_answer(text, RAF)
  assert got == (metrics.UNPARSED if want is None else RAF.index(want))


def test_parse_answer_uses_dataset_spelling():
  dfew = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
  assert metrics.parse_answer("Happiness", dfew) == 0
  assert metrics.parse_answer("anger.", dfew) == 3
  # An emotion that is not an option of this dataset is not a match.
  assert metrics.parse_answer("contempt", dfew) == metrics.UNPARSED


def test_group_breakdown():
  out = metrics.group_breakdown([0, 1, 0, 1], [0, 1, 1, 1], ("a", "b"),
                                {"gender": ["male", "male", "female", "female"]})
  assert out["gender"]["male"]["war"] == 1.0
  assert out["gender"]["female"]["war"] == 0.5
  assert out["gender"]["female"]["uar"] == pytest.approx(0.5)
