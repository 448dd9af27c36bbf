"""Test setup: 8 fake CPU devices, fp32 matmuls, before jax is imported anywhere; one
persistent XLA compilation cache for the whole run; and the fixtures many test files share
(tiny tokenizers, built once per session)."""
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests (and the jobs they start as subprocesses) compile the same programs: the tiny
# configs' train, eval and predict steps. One on-disk cache per test run, made by the first
# pytest process and inherited through the environment by the xdist workers and every
# subprocess, compiles each once. Programs that compile in under a second are not stored.
_CACHE_ENV = "EMO_JAX_TEST_XLA_CACHE"
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="emo_jax_test_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_CACHE_ENV])

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):   # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> str:
  """Path of a tiny LLaMA-style SentencePiece model (tokenizer_testutil)."""
  from tokenizer_testutil import train_sentencepiece
  return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def bert_vocab(tmp_path_factory) -> str:
  """Path of a small BERT WordPiece vocab.txt (tokenizer_testutil.BERT_VOCAB)."""
  from tokenizer_testutil import write_bert_vocab
  return write_bert_vocab(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def llama_tok(sentencepiece_model):
  from input_pipeline import tokenizers
  return tokenizers.LlamaTokenizer(sentencepiece_model)


@pytest.fixture(scope="session")
def toks(llama_tok, bert_vocab):
  """(LlamaTokenizer, BertTokenizer): the pair the pipeline tests tokenize with."""
  from input_pipeline import tokenizers
  return llama_tok, tokenizers.BertTokenizer(bert_vocab)
