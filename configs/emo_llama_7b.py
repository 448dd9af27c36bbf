"""EMO-LLaMA 7B at paper scale: EVA-ViT-G + InstructBLIP Q-Former + Vicuna-7B v1.5 + LoRA.

    python -m emo_jax.main --config=configs/emo_llama_7b.py --workdir=gs://.../run1 \\
        --config.init.llm=/ckpt/vicuna-7b-v1.5 --config.init.vision=/ckpt/eva_vit_g.safetensors \\
        --config.init.qformer=/ckpt/instructblip-vicuna7b --config.init.face_prior=/ckpt/facexformer \\
        --config.data.root=/data --config.data.tokenizer=/ckpt/vicuna-7b-v1.5/tokenizer.model \\
        --config.data.qformer_vocab=/ckpt/bert-base-uncased/vocab.txt

Facts (shared/DESIGN.md; LLaMA-VID stage 2 and the EMO-LLaMA paper): frozen EVA-ViT-G/14
(224 px, block 39 of 40), InstructBLIP Q-Former with 32 queries, Vicuna-7B v1.5 (32 x 4096,
vocab 32000), vicuna_v1 template, lr 2e-4 for LoRA and 2e-5 for the fully trained modules,
cosine with 3% warmup, global batch 128, max length 2048, bf16, 1-3 epochs. The face
module and projectors train in full, the LLM through LoRA.
Our choices (the paper gives no code): LoRA r=128 / alpha=256 on all LLM linears (LLaVA's
LoRA recipe), FaceXFormer as the face prior with 4 face tokens per frame, 4 frames per
clip with 'mean' content compression, weight decay 0, global-norm clipping 1.0, FSDP
over all chips (MaxText-style rules; emo_jax.sharding.RULES_FSDP), remat of each decoder
layer, every checkpoint path a config field.

get_config(arg): 'fsdp' (default) | 'fsdp_tp' (adds tensor parallelism, mesh (1, -1, 4))
| 'dp' ; append ',video' to train on DFEW clips too.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = [a for a in (arg or "fsdp").split(",") if a]
  plan = next((a for a in opts if a in ("fsdp", "fsdp_tp", "dp")), "fsdp")
  unknown = set(opts) - {"fsdp", "fsdp_tp", "dp", "video"}
  if unknown:
    raise ValueError(f"unknown emo_llama_7b presets {sorted(unknown)}")
  c = ml_collections.ConfigDict()
  c.seed = 0

  m = c.model = ml_collections.ConfigDict()
  m.llm = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16",
               # Frozen base weights stored in bf16 (as released); LoRA factors stay fp32.
               param_dtype="bfloat16", scan_layers=True, remat_policy="full")
  m.vision = dict(kind="eva", hidden_size=1408, intermediate_size=6144, num_hidden_layers=40,
                  num_attention_heads=16, patch_size=14, image_size=224, layer_norm_eps=1e-6,
                  hidden_act="gelu", feature_layer=39, dtype="bfloat16", param_dtype="bfloat16",
                  remat=True)
  m.qformer = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                   encoder_hidden_size=1408, num_query_tokens=32, cross_attention_frequency=2,
                   dtype="bfloat16", param_dtype="float32")
  m.compress_type = "mean"
  m.use_face = True
  m.face_prior = "facexformer"
  m.facexformer = dict()
  m.face = dict(face_dim=256, hidden_dim=768, num_heads=12, num_tokens=4, query_mode="qformer",
                qformer_dim=768)
  m.trainable = ("qformer", "projectors", "face", "lora")
  m.lora_rank = 128
  m.lora_alpha = 256.0

  c.init = ml_collections.ConfigDict(dict(
      bundle="",                 # an emo_jax bundle (resume a previous export)
      llama_vid="",              # a LLaMA-VID checkpoint dir (LLM + Q-Former + projectors)
      llm="",                    # HF Vicuna-7B v1.5 directory
      vision="",                 # LAVIS eva_vit_g (safetensors copy, or .pth + allow_pickle)
      qformer="",                # InstructBLIP checkpoint (Q-Former + query tokens)
      face_prior="",             # FaceXFormer checkpoint
      allow_pickle=False))

  d = c.data = ml_collections.ConfigDict()
  d.root = "/data"
  d.tokenizer = ""               # Vicuna tokenizer.model (required)
  d.qformer_vocab = ""           # bert-base-uncased vocab.txt (required)
  d.strict = False
  d.synthetic = dict(generate=False, num_images=0, num_clips=0, seed=0, image_size=112)
  d.train = [dict(name="rafdb", root="/data/RAF-DB/basic", split="train"),
             dict(name="ferid", root="/data/FERID/ferid_train.json", split="train",
                  media_root="/data")]
  d.eval = [dict(name="rafdb", root="/data/RAF-DB/basic", split="test"),
            dict(name="affectnet", root="/data/AffectNet", split="val"),
            dict(name="ferplus", root="/data/FERPlus", split="test")]
  d.pipeline = dict(global_batch_size=128, num_frames=4, max_length=2048,
                    bucket_lengths=(512, 1024, 2048), qformer_max_length=64, aspect="pad",
                    face_mode="detect_or_full", worker_count=8, read_threads=4,
                    # Frozen-prior mode (docs/FROZEN_PRIORS.md): '' = run the prior online.
                    priors_dir="", agr_prompt=False)

  o = c.optimizer = ml_collections.ConfigDict()
  o.lr = 2e-5                    # fully trained modules (Q-Former, projectors, face module)
  o.warmup_frac = 0.03
  o.end_lr_frac = 0.0
  o.weight_decay = 0.0
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.grad_clip = 1.0
  o.groups = (("lora", r"^language_model/.*lora_[ab]$", 2e-4),)

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 0
  t.num_epochs = 1.0
  t.accum_steps = 1
  t.compute_dtype = "bfloat16"
  t.log_every = 10
  t.peak_flops_per_device = -1.0   # from the device kind (emo_jax.train.loop.PEAK_FLOPS)
  t.log_batch_hashes = False

  k = c.checkpoint = ml_collections.ConfigDict()
  k.every_steps = 500
  k.every_secs = 1800.0
  k.max_to_keep = 3
  k.keep_period = 2000
  k.async_save = True

  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))
  c.sharding = ml_collections.ConfigDict(dict(rules=plan))
  if plan == "fsdp_tp":
    c.mesh.shape = (1, -1, 4)
  elif plan == "dp":
    c.mesh.shape = (-1, 1, 1)

  e = c.eval = ml_collections.ConfigDict()
  e.at_end = True
  e.modes = ("generate", "likelihood")
  e.batch_size = 64
  e.max_new_tokens = 16
  e.max_examples = 0

  p = c.predict = ml_collections.ConfigDict()
  p.dataset = "rafdb"
  p.face_mode = "detect"
  p.crop_to_face = True
  p.face_margin = 0.2
  p.window_secs = 2.0
  p.max_new_tokens = 32

  from configs import default  # pylint: disable=g-import-not-at-top
  c.serve = default.serve_defaults()

  x = c.export = ml_collections.ConfigDict()
  x.at_end = True
  x.formats = ("hf", "peft", "bundle")
  x.dtype = "bfloat16"

  if "video" in opts:
    d.train.append(dict(name="dfew", root="/data/DFEW", split="train", fold=1))
    d.eval.append(dict(name="dfew", root="/data/DFEW", split="test", folds=[1, 2, 3, 4, 5]))
  return c
