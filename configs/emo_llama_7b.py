"""EMO-LLaMA 7B at paper scale: EVA-ViT-G + InstructBLIP Q-Former + Vicuna-7B v1.5 + LoRA.

    python -m emo_jax.main --config=configs/emo_llama_7b.py --workdir=gs://.../run1 \\
        --config.init.llm=/ckpt/vicuna-7b-v1.5 --config.init.vision=/ckpt/eva_vit_g.safetensors \\
        --config.init.qformer=/ckpt/instructblip-vicuna7b --config.init.face_prior=/ckpt/facexformer \\
        --config.data.root=/data --config.data.tokenizer=/ckpt/vicuna-7b-v1.5/tokenizer.model \\
        --config.data.qformer_vocab=/ckpt/bert-base-uncased/vocab.txt

Facts (docs/MODEL.md; LLaMA-VID stage 2 and the EMO-LLaMA paper): frozen EVA-ViT-G/14
(224 px, block 39 of 40), InstructBLIP Q-Former with 32 queries, Vicuna-7B v1.5 (32 x 4096,
vocab 32000), vicuna_v1 template, lr 2e-4 for LoRA and 2e-5 for the fully trained modules,
cosine with 3% warmup, global batch 128, max length 2048, bf16, 1-3 epochs. The face
module and projectors train in full, the LLM through LoRA.
Our choices (the paper gives no code): LoRA r=128 / alpha=256 on all LLM linears (LLaVA's
LoRA recipe), FaceXFormer as the face prior with 4 face tokens per frame, 4 frames per
clip with 'mean' content compression, weight decay 0, global-norm clipping 1.0, FSDP
over all chips (MaxText-style rules; emo_jax.sharding.RULES_FSDP), remat of each decoder
layer, every checkpoint path a config field.

The run-level recipe (optimiser, schedule, batch, checkpoints, evaluation) is the base
config's (configs/base.py); this file adds the model, the data and the sharding plan.

get_config(arg): one sharding plan, 'fsdp' (default) | 'fsdp_tp' (adds tensor parallelism,
mesh (1, -1, 4)) | 'dp', and optionally ',video' to train on DFEW clips too.
"""
import ml_collections

from configs import base

PLANS = ("fsdp", "fsdp_tp", "dp")
MESH_SHAPES = {"fsdp": (1, -1, 1), "fsdp_tp": (1, -1, 4), "dp": (-1, 1, 1)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  presets = base.parse_presets(arg, config="emo_llama_7b.py", flags=("video",), one_of=PLANS)
  c = base.get_base_config()

  m = c.model
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
  m.face_prior = "facexformer"
  m.facexformer = dict()
  m.face = dict(face_dim=256, hidden_dim=768, num_heads=12, num_tokens=4, query_mode="qformer",
                qformer_dim=768)
  m.trainable = ("qformer", "projectors", "face", "lora")
  m.lora_rank = 128
  m.lora_alpha = 256.0

  d = c.data
  d.root = "/data"               # dataset roots below are relative to it (the launcher's
                                 # data step copies gs://.../ here and passes it)
  d.train = [dict(name="rafdb", root="RAF-DB/basic", split="train"),
             dict(name="ferid", root="FERID/ferid_train.json", split="train", media_root=".")]
  d.eval = [dict(name="rafdb", root="RAF-DB/basic", split="test"),
            dict(name="affectnet", root="AffectNet", split="val"),
            dict(name="ferplus", root="FERPlus", split="test")]

  # lr 2e-5 (base) for the fully trained modules (Q-Former, projectors, face module).
  c.optimizer.groups = (("lora", r"^language_model/.*lora_[ab]$", 2e-4),)

  c.mesh.shape = MESH_SHAPES[presets.choice]
  c.sharding.rules = presets.choice

  if "video" in presets:
    d.train.append(dict(name="dfew", root="DFEW", split="train", fold=1))
    d.eval.append(dict(name="dfew", root="DFEW", split="test", folds=[1, 2, 3, 4, 5]))
  return c
