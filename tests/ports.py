"""Free TCP ports for the servers the tests start (JAX coordinators, HTTP servers, the GCS
emulator) that nothing else on the machine can take before the server binds.

A port from ``bind(port=0)`` lies in the kernel's ephemeral range, the range every outgoing
connection draws its local port from; between the test choosing it and the server binding
it (seconds for a JAX coordinator that starts after an install step), a client socket of a
concurrent test can hold it and the server fails to start (the JAX coordination service
then crashes its process, and its peers wait for it). A port below the ephemeral range is
handed out only on explicit request, so choosing one at random and checking that it binds
on every address family leaves only a collision with another explicit pick.
"""
import random
import socket

_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def _ephemeral_range() -> tuple[int, int]:
  try:
    with open(_RANGE_FILE) as f:
      lo, hi = (int(x) for x in f.read().split())
    return lo, hi
  except (OSError, ValueError):
    return 32768, 60999   # the Linux default


def free_port() -> int:
  """A port outside the ephemeral range that binds now (see the module docstring)."""
  # Imported here: the emulator script imports this module without the repository on its path.
  from emo_jax.main import port_in_use
  lo, hi = _ephemeral_range()
  candidates = (10000, lo - 1) if lo > 11000 else (hi + 1, 65535)
  if candidates[1] - candidates[0] < 1000:   # the ephemeral range spans nearly everything
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]
  rng = random.SystemRandom()
  for _ in range(200):
    port = rng.randint(*candidates)
    if not port_in_use(port):
      return port
  raise RuntimeError(f"no free port in {candidates} after 200 tries")
