"""Shared pieces of the LLaMA-VID import / export tests: sizes and torch re-implementations
of LLaMA-VID's own computations."""
import math

import torch
import torch.nn.functional as F

CV, HEADS_V, PATCH, IMG, DEPTH, MLP_V = 24, 2, 4, 16, 2, 48
NQ, GRID = 4, 2


def _torch_eva(sd, x):
  """EVA-ViT-G forward as LAVIS writes it (qkv bias = cat(q_bias, 0, v_bias), exact GELU,
  LN eps 1e-6, raw output of the last block). x: NCHW."""
  h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
  h = h.flatten(2).transpose(1, 2)
  h = torch.cat([sd["cls_token"].expand(h.shape[0], -1, -1), h], 1) + sd["pos_embed"]
  d = CV // HEADS_V
  for i in range(DEPTH):
    p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
    y = F.layer_norm(h, (CV,), p("norm1.weight"), p("norm1.bias"), 1e-6)
    bias = torch.cat([p("attn.q_bias"), torch.zeros(CV), p("attn.v_bias")])
    qkv = F.linear(y, p("attn.qkv.weight"), bias).reshape(h.shape[0], -1, 3, HEADS_V, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(h.shape[0], -1, CV)
    h = h + F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
    y = F.layer_norm(h, (CV,), p("norm2.weight"), p("norm2.bias"), 1e-6)
    y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
                 p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    h = h + y
  return h


def _lavis_qformer_key(k: str) -> str:
  """HF InstructBLIP Q-Former name -> the BERT/LAVIS name LLaMA-VID checkpoints use."""
  k = k.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
  k = k.replace(".attention.attention.", ".attention.self.")
  return k.replace(".crossattention.attention.", ".crossattention.self.")


def _torch_frame_tokens(ck, pixels, qids, qmask, *, select="patch", compress=f"grid:{GRID}"):
  """LLaMA-VID per-frame tokens [ctx, content...] for NHWC pixels of one sample's frames
  (`vlm_attention` + `token_generation`, re-written on the reference modules)."""
  mods = ck["mods"]
  x = _torch_eva(ck["eva"], torch.tensor(pixels).permute(0, 3, 1, 2))
  n = x.shape[0]
  qids = torch.tensor(qids)[None].expand(n, -1).long()
  att = torch.cat([torch.ones(n, NQ, dtype=torch.long), torch.tensor(qmask)[None].expand(n, -1)],
                  1)
  bert_feat = mods["vlm_att_bert_proj"](x) if "vlm_att_bert_proj" in mods else x
  q_out = ck["qformer"](input_ids=qids, attention_mask=att,
                        query_embeds=ck["query"].expand(n, -1, -1),
                        encoder_hidden_states=mods["vlm_att_ln"](bert_feat)
                        ).last_hidden_state[:, :NQ]
  text_q = mods["vlm_att_projector"](q_out)
  vis = x[:, 1:] if select == "patch" and x.shape[1] % 2 == 1 else x  # CLS dropped for 'patch'
  # LLaMA-VID token_generation: key projection, scale by the raw width, values = raw patches.
  s = text_q @ mods["vlm_att_key_projector"](vis).transpose(-1, -2) / math.sqrt(vis.shape[-1])
  ctx = mods["vlm_att_val_projector"]((s.softmax(-1) @ vis).mean(1)[:, None])
  if compress.startswith("grid:"):
    g = int(compress.split(":")[1])
    side = int(vis.shape[1] ** 0.5)
    vis = F.avg_pool2d(vis.reshape(n, side, side, -1).permute(0, 3, 1, 2),
                       kernel_size=side // g, stride=side // g, padding=0)
    vis = vis.permute(0, 2, 3, 1).flatten(1, 2)
  elif compress == "mean":
    vis = vis.mean(dim=1, keepdim=True)
  content = mods["mm_projector"](vis)
  return torch.cat([ctx, content], 1)
