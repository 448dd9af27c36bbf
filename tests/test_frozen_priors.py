"""Frozen-prior mode (docs/FROZEN_PRIORS.md): priors precomputed once per sample give the
same loss as running the frozen face prior inside EmoLlama on `face_crops` every step."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from emo_jax.jobs import precompute_priors as pp
from emo_jax.models import emo_llama
from input_pipeline import datasets, media, pipeline, synthetic
from input_pipeline.prior_store import PriorStore
from input_pipeline.records import BadInputError, SkipCounter
from tokenizer_testutil import BERT_VOCAB

NUM_FRAMES = 2
LENGTH = 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory, toks):
  d = tmp_path_factory.mktemp("frozen_priors")
  llama, bert = toks
  root = str(d / "data")
  synthetic.generate(root, num_images=4, num_clips=2, image_size=40, clip_size=40,
                     clip_frames=6, conversation_fraction=0.0)
  skips = SkipCounter(strict=True)
  records = (datasets.load_records("synthetic", root, split="train", kind="image", skips=skips)
             + datasets.load_records("synthetic", root, split="train", kind="video",
                                     skips=skips)
             + datasets.load_records("synthetic", root, split="test", kind="video",
                                     skips=skips))
  assert {r.media_type for r in records} == {"image", "video"}
  base = emo_llama.EmoLlamaConfig.tiny()
  mcfg = base.replace(
      llm=dataclasses.replace(base.llm, vocab_size=512),
      qformer=dataclasses.replace(base.qformer, vocab_size=len(BERT_VOCAB)))
  model = emo_llama.EmoLlama(mcfg, rngs=nnx.Rngs(0))
  cfg = pipeline.PipelineConfig(
      global_batch_size=len(records), num_frames=NUM_FRAMES,
      tokens_per_frame=mcfg.tokens_per_frame, max_length=LENGTH, bucket_lengths=(LENGTH,),
      qformer_max_length=24, image_size=mcfg.vision.image_size,
      face_size=mcfg.tiny_face_prior.image_size, face_mode="aligned", shuffle=False,
      num_epochs=1, drop_remainder=False, agr_template=mcfg.agr_template)
  # The model's own frozen prior, run once per sample over the pipeline's decoding.
  runner = pp.PriorRunner(model.face_prior, batch_size=4)
  items = list(pipeline.face_crop_items(records, cfg))
  assert [rid for rid, _ in items] == [r.id for r in records]
  # uint8 crops in the face geometry, as the batch's face_crops; the runner normalises them.
  assert all(c.dtype == np.uint8 and c.shape[1:] == (cfg.face_size, cfg.face_size, 3)
             for _, c in items)
  pp.precompute_priors(runner, items, str(d / "priors"), num_shards=2)

  @nnx.jit
  def forward(m, batch):
    loss, aux = m.loss(batch)
    return loss, aux["num_tokens"], m(batch)

  return dict(d=d, llama=llama, bert=bert, records=records, model=model, cfg=cfg,
              runner=runner, items=items, priors_dir=str(d / "priors"), forward=forward)


def _batch(s, cfg, source=None, skips=None):
  it = pipeline.make_iterator(source if source is not None else s["records"], cfg,
                              s["llama"], s["bert"], skips=skips, process_index=0,
                              process_count=1)
  return next(it)


def _model_batch(batch):
  return {k: v for k, v in batch.items() if k != "label"}


def test_precomputed_priors_give_the_online_loss(setup):
  s = setup
  online = _batch(s, s["cfg"])
  frozen = _batch(s, dataclasses.replace(s["cfg"], priors_dir=s["priors_dir"]))
  assert "face_crops" in online and "face_global" not in online
  assert "face_crops" not in frozen and {"face_global", "face_local"} <= set(frozen)
  for key in online:  # everything but the face inputs is the same batch
    if key != "face_crops":
      np.testing.assert_array_equal(online[key], frozen[key], err_msg=key)
  mask = frozen["frame_mask"]
  assert mask.sum(1).tolist() == [1 if r.media_type == "image" else NUM_FRAMES
                                  for r in s["records"]]
  # The stored priors are the prior net's output on the batch's own crops (uint8, normalised
  # as the model does); padding is zero.
  b, f = mask.shape
  assert online["face_crops"].dtype == np.uint8
  for i, (rid, crops) in enumerate(s["items"]):  # batch order = record order (no shuffle)
    np.testing.assert_array_equal(online["face_crops"][i, :len(crops)], crops, err_msg=rid)
  crops = online["face_crops"].reshape((b * f,) + online["face_crops"].shape[2:])
  priors = s["model"].face_prior(s["model"].face_inputs(crops)).reshape_frames(b, f)
  for key, attr in (("face_global", "global_feats"), ("face_local", "local_feats")):
    np.testing.assert_allclose(frozen[key][mask], np.asarray(getattr(priors, attr))[mask],
                               atol=1e-5, err_msg=key)
    assert not frozen[key][~mask].any()

  loss_on, n_on, logits_on = s["forward"](s["model"], _model_batch(online))
  loss_fr, n_fr, logits_fr = s["forward"](s["model"], _model_batch(frozen))
  assert float(n_on) == float(n_fr) > 0
  np.testing.assert_allclose(float(loss_fr), float(loss_on), atol=1e-5, rtol=0)
  att = online["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(logits_fr)[att], np.asarray(logits_on)[att], atol=1e-4)
  # The face tokens matter: other priors move the logits far beyond the tolerance above.
  rng = np.random.default_rng(0)
  moved = dict(_model_batch(frozen), **{k: 3 * rng.normal(size=frozen[k].shape).astype(
      np.float32) for k in ("face_global", "face_local")})
  logits_moved = np.asarray(s["forward"](s["model"], moved)[2])
  assert np.abs(logits_moved[att] - np.asarray(logits_on)[att]).max() > 1e-2


def test_stored_agr_sentence_equals_the_online_prior_pass(setup):
  s = setup
  cfg = s["cfg"]
  online = _batch(s, cfg)
  medias = ["image" if r.media_type == "image" else "video" for r in s["records"]]
  # Online: the model's prior runs on the crops, its AGR sentence goes into the prompt.
  sentences = s["model"].agr_sentences(online, medias)
  elements = [{"record": r, "frames": media.load_media(r, 1 if r.media_type == "image"
                                                       else NUM_FRAMES),
               "agr_sentence": sent} for r, sent in zip(s["records"], sentences)]
  online_agr = _batch(s, cfg, source=elements)
  frozen_agr = _batch(s, dataclasses.replace(cfg, priors_dir=s["priors_dir"], agr_prompt=True))
  np.testing.assert_array_equal(frozen_agr["input_ids"], online_agr["input_ids"])
  np.testing.assert_array_equal(frozen_agr["loss_mask"], online_agr["loss_mask"])
  # The sentence really is in the prompt: longer than the prompt without it.
  assert (frozen_agr["attention_mask"].sum(1) > online["attention_mask"].sum(1)).all()
  loss_on = s["forward"](s["model"], _model_batch(online_agr))[0]
  loss_fr = s["forward"](s["model"], _model_batch(frozen_agr))[0]
  np.testing.assert_allclose(float(loss_fr), float(loss_on), atol=1e-5, rtol=0)


def test_missing_and_mismatched_priors_are_counted(setup, tmp_path):
  s = setup
  records, items = s["records"], s["items"]
  dropped = records[-1].id
  pp.precompute_priors(s["runner"], [it for it in items if it[0] != dropped],
                       str(tmp_path / "partial"))
  cfg = dataclasses.replace(s["cfg"], priors_dir=str(tmp_path / "partial"))
  skips = SkipCounter()
  batch = _batch(s, cfg, skips=skips)
  assert skips.counts == {"missing_priors": 1}
  assert len(batch["input_ids"]) == len(records) - 1
  with pytest.raises(BadInputError, match="missing_priors"):
    _batch(s, cfg, skips=SkipCounter(strict=True))
  # Priors of 3 sampled frames do not belong to the 2 frames the pipeline decodes.
  three = dataclasses.replace(s["cfg"], num_frames=3, tokens_per_frame=s["cfg"].tokens_per_frame)
  pp.precompute_priors(s["runner"], pipeline.face_crop_items(records, three),
                       str(tmp_path / "three"))
  skips = SkipCounter()
  batch = _batch(s, dataclasses.replace(s["cfg"], priors_dir=str(tmp_path / "three")),
                 skips=skips)
  n_videos = sum(r.media_type == "video" for r in records)
  assert skips.counts == {"priors_mismatch": n_videos}
  assert len(batch["input_ids"]) == len(records) - n_videos


def test_agr_prompt_needs_priors_dir(setup):
  with pytest.raises(ValueError, match="priors_dir"):
    dataclasses.replace(setup["cfg"], agr_prompt=True)


def test_cli_from_records_matches_the_api(setup, tmp_path, monkeypatch):
  """`python -m emo_jax.jobs.precompute_priors --dataset=...` (the prior network loader
  replaced by the model's tiny prior) stores what face_crop_items + precompute_priors store."""
  from emo_jax.convert import facexformer as convert
  s = setup
  monkeypatch.setattr(convert, "load_facexformer", lambda *a, **k: s["model"].face_prior)
  root = str(s["d"] / "data")
  out = str(tmp_path / "cli")
  rc = pp.main([f"--dataset=synthetic", f"--root={root}", "--split=train",
                '--reader_options={"kind": "all"}', f"--num_frames={NUM_FRAMES}",
                f"--face_size={s['cfg'].face_size}", "--checkpoint=unused", f"--out_dir={out}",
                "--batch_size=4"])
  assert rc == 0
  cli, api = PriorStore(out), PriorStore(s["priors_dir"])
  train_ids = {r.id for r in s["records"] if r.split == "train"}
  assert set(cli.ids()) == train_ids and len(train_ids) < len(api)
  for rid in train_ids:
    for key in ("face_global", "face_local", "age_logits"):
      np.testing.assert_allclose(cli[rid][key], api[rid][key], atol=1e-6, err_msg=f"{rid} {key}")
  assert pp.main(["--checkpoint=x", f"--out_dir={out}"]) == 2  # neither --shards nor --dataset
