"""The package boundary: the data side never imports the model side, and no import cycles."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("emo_jax", "input_pipeline")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
  t = node.test
  return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
      isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: pathlib.Path) -> set[str]:
  """Absolute names a file imports, at any depth (`from a.b import c` gives a.b.c: the module
  a.b.c if there is one, else the name c of module a.b); TYPE_CHECKING blocks excluded."""
  tree = ast.parse(path.read_text())
  out: set[str] = set()

  def visit(nodes):
    for node in nodes:
      if isinstance(node, ast.If) and _is_type_checking(node):
        continue
      if isinstance(node, ast.Import):
        out.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        out.update(f"{node.module}.{a.name}" for a in node.names)
      else:
        for field in ("body", "orelse", "finalbody", "handlers"):
          child = getattr(node, field, None)
          if isinstance(child, list):
            visit(child)
  visit(tree.body)
  return out


def _files(package: str):
  return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def test_input_pipeline_imports_nothing_from_emo_jax():
  offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p)
                                                 if n.split(".")[0] == "emo_jax")
               for p in _files("input_pipeline")}
  assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycle():
  modules = {_module_name(p): p for pkg in PACKAGES for p in _files(pkg)}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for imp in _imports(path):
      # The longest known module that the import names (a.b.c may be a module or a name in a.b).
      parts = imp.split(".")
      for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in modules:
          # A package's own parents are always imported before it: not a dependency edge.
          if cand != name and not name.startswith(cand + "."):
            deps.add(cand)
          break
    graph[name] = deps
  # Tarjan's strongly connected components: any component of size > 1 is a cycle.
  index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
  for v in graph:
    if v not in index:
      strong(v)
  assert cycles == []


def _run(code: str) -> str:
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        check=True).stdout.strip()


def test_the_data_side_loads_no_flax_and_no_emo_jax():
  out = _run("import sys\n"
             "import input_pipeline.pipeline, input_pipeline.datasets, input_pipeline.media\n"
             "import input_pipeline.prior_store, input_pipeline.contract\n"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'emo_jax'))\n"
             "print(','.join(bad) or 'clean')")
  assert out == "clean"


def test_importing_emo_jax_changes_no_global_flax_setting():
  out = _run("from flax import nnx\n"
             "before = nnx.using_eager_sharding()\n"
             "import emo_jax, emo_jax.models.emo_llama, emo_jax.train.loop\n"
             "print(before == nnx.using_eager_sharding(), before)")
  assert out.startswith("True")


def test_models_build_whatever_the_eager_sharding_setting():
  from flax import nnx

  from emo_jax.models import LlamaConfig, LlamaForCausalLM
  cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
  for eager in (True, False):
    with nnx.use_eager_sharding(eager):
      m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    assert m.model.embed_tokens.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")


def test_public_names():
  from emo_jax import models
  from emo_jax.convert import hf, llama_hf
  from emo_jax.models import emo_llama, llama
  assert models.EmoLlama is emo_llama.EmoLlama and models.EmoLlamaConfig is emo_llama.EmoLlamaConfig
  assert models.LlamaForCausalLM is llama.LlamaForCausalLM
  assert {"EmoLlama", "LlamaForCausalLM", "generate"} <= set(dir(models))
  assert {"load_llama", "load_llama_vid", "load_bundle"} <= set(dir(hf))
  assert hf.load_llama is llama_hf.load_llama
  with pytest.raises(AttributeError):
    getattr(models, "NoSuchModel")


def test_the_contract_constants_exist_once():
  from emo_jax.models import emo_llama, face_prior, pixels
  from input_pipeline import contract, media, template
  assert pixels.CLIP_MEAN is contract.CLIP_MEAN and media.CLIP_MEAN is contract.CLIP_MEAN
  assert pixels.IMAGENET_STD is contract.IMAGENET_STD and media.IMAGENET_STD is contract.IMAGENET_STD
  assert emo_llama.IMAGE_TOKEN_ID == template.IMAGE_TOKEN_ID == contract.IMAGE_TOKEN_ID
  assert face_prior.AGE_BINS is contract.AGE_BINS
  # Defined in contract.py alone: no other file assigns these names.
  names = ("CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_TOKEN_ID",
           "AGE_BINS", "GENDERS", "RACES", "AGR_TEMPLATE", "MODEL_KEYS")
  for pkg in PACKAGES:
    for p in _files(pkg):
      if p.name == "contract.py":
        continue
      for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
          targets = node.targets if isinstance(node, ast.Assign) else [node.target]
          for t in targets:
            assert not (isinstance(t, ast.Name) and t.id in names), f"{p}: {t.id}"
