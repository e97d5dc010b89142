"""Test-session setup: in-process tests share the persistent XLA compilation cache that
the subprocess runs use (tests/helpers.py), so a program compiled by one xdist worker,
or by an earlier test that built an identical jitted closure, is loaded instead of
compiled again. Executables are the same either way (the cache is keyed by the HLO and
the compile options), so no numerics change."""
import jax

from tests.helpers import JAX_CACHE

jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
