"""The embedded default: a tiny EMO-LLaMA trained on procedurally generated faces, on CPU.

    python -m emo_jax.main --config=configs/default.py --workdir=./workdir

Synthetic RAF-DB-layout stills (input_pipeline.synthetic) are generated into
`<workdir>/data` on first use, with a small SentencePiece model and WordPiece vocab trained
on their text (emo_jax.train.assets). Every module is random and tiny.

Our choices, different from the paper config on purpose:
- the vision tower is *trainable* here (it is random, so a frozen one would only give
  random features); in the paper config it is a frozen pretrained EVA-ViT-G;
- the LLM is trained in full and LoRA is off (a random 2-layer LLM has nothing to adapt);
- images only (no clips) so that train + eval + export stay short on 2 CPU cores;
  `:video` adds the DFEW-layout clips (4 frames) and a 5-fold video evaluation.

get_config(arg): arg is a comma list of presets: 'video' (add clips), 'test' (even
smaller and shorter, for the test suite).
"""
import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  presets = base.parse_presets(arg, config="default.py", flags=("video", "test"))
  c = base.get_base_config()

  # ---- model (emo_jax.models.emo_llama.EmoLlamaConfig as data)
  m = c.model
  m.llm = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, dtype="float32", param_dtype="float32", remat_policy="none")
  m.vision = dict(kind="clip", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=8, image_size=48, layer_norm_eps=1e-5,
                  hidden_act="quick_gelu", feature_layer=-1)
  m.qformer = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64, encoder_hidden_size=48,
                   num_query_tokens=4, cross_attention_frequency=2)
  m.compress_type = "grid:2"          # 4 content tokens per frame: keeps where the mouth is
  m.face_prior = "tiny"
  m.tiny_face_prior = dict(image_size=32, channels=(8, 16), feat_dim=16, global_grid=2)
  m.face = dict(face_dim=16, hidden_dim=32, num_heads=2, num_tokens=2, query_mode="learned",
                qformer_dim=32)
  m.trainable = ("vision", "qformer", "projectors", "face", "llm")

  # ---- data: the synthetic stills, made on first use (tokenizers too)
  d = c.data
  d.synthetic = dict(generate=True, num_images=2100, num_clips=0, seed=0, image_size=64)
  d.train = [dict(name="synthetic", kind="image", split="train")]
  d.eval = [dict(name="synthetic", kind="image", split="test", label="synthetic_images")]
  d.pipeline.update(global_batch_size=16, num_frames=1, max_length=160, bucket_lengths=(160,),
                    qformer_max_length=64, face_mode="aligned", worker_count=0, read_threads=1)

  # ---- optimisation
  o = c.optimizer
  o.lr = 2e-3
  o.warmup_frac = 0.05
  o.end_lr_frac = 0.05
  o.b2 = 0.98
  o.groups = (("vision", r"^vision_tower/", 1e-3),)   # (name, regex, peak lr)

  t = c.train
  t.num_steps = 2400
  t.num_epochs = 0.0
  t.compute_dtype = "float32"
  t.log_every = 25

  k = c.checkpoint
  k.every_steps = 600
  k.every_secs = 0.0
  k.max_to_keep = 2
  k.keep_period = 0

  e = c.eval
  e.batch_size = 32
  e.max_new_tokens = 4

  p = c.predict
  p.dataset = "synthetic"
  p.crop_to_face = False           # the synthetic model saw whole aligned frames
  p.max_new_tokens = 8

  c.export.dtype = "float32"

  # ---- action units (emo_jax.train.au_train): an AUFormer head on the trained, now frozen,
  # vision tower, trained per fold on the synthetic faces' AU sequences (BP4D layout)
  a = c.au = ml_collections.ConfigDict()
  a.enabled = True
  a.synthetic = dict(generate=True, num_subjects=27, num_tasks=8, num_frames=8, seed=0,
                     image_size=64)
  a.data = dict(name="synthetic_au", root="", options={})
  a.folds = (1, 2, 3)
  a.head = dict(bottleneck=8, dilations=(1, 3, 5), ca_softmax="positions", layers=(),
                pool="mean", head_hidden=64, deep_supervision=True, visual_tokens="frozen",
                zero_init_out=True)                    # layers=(): every ViT block
  a.loss = dict(margin=0.05, gamma_neg=2.0, gamma_pos=0.0, detach_focus=False,
                deep_supervision_weight=0.5)
  a.optimizer = dict(lr=1e-2, warmup_frac=0.05, end_lr_frac=0.05, weight_decay=0.0,
                     b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
  a.train = dict(num_steps=300, batch_size=32, aspect="pad", read_threads=2)
  a.eval_batch_size = 64
  # AU sentence in the LLM prompt: source 'labels' (the record's AU labels) or a JSON of AU
  # head predictions {record id: [AUs]} (au_train.write_predictions); off in the default
  a.prompt = dict(enabled=False, source="labels", template="Active facial action units: {aus}.")
  # multi-task affective evaluation (emo_jax.train.affect_eval): emotion choice / open /
  # yes-no and AU list / yes-no questions to the LLM; off in the default (its tiny LLM is
  # not trained on AU questions)
  a.affect_eval = dict(enabled=False, max_examples=0, max_new_tokens=24, seed=0,
                       emotion=dict(name="synthetic", kind="image", split="test"))

  if "video" in presets:
    d.synthetic.num_clips = 140
    d.pipeline.num_frames = 4
    d.pipeline.max_length = 176
    d.pipeline.bucket_lengths = (176,)
    d.train.append(dict(name="synthetic", kind="video", split="train", fold=1))
    d.eval.append(dict(name="synthetic", kind="video", split="test", folds=[1, 2, 3, 4, 5],
                       label="synthetic_clips"))
  if "test" in presets:
    d.synthetic.num_images = 70
    d.pipeline.global_batch_size = 8
    t.num_steps = 6
    t.log_every = 1
    k.every_steps = 2
    e.batch_size = 8
    e.max_new_tokens = 2
    a.synthetic.update(num_subjects=6, num_tasks=2, num_frames=3)
    a.folds = (1,)
    a.train.update(num_steps=3, batch_size=8)
    a.eval_batch_size = 8
  return c
