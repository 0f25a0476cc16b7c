"""Test setup: 8 virtual CPU devices (sharding tests), grain's absl flags parsed."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
from absl import flags  # noqa: E402

# XLA:CPU compiles partitionable threefry initialisers ~10x slower on conv-shaped params;
# the values differ but stay independent of sharding, which is all tests need.
jax.config.update("jax_threefry_partitionable", False)

# grain's multiprocessing workers read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
