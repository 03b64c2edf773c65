"""Settings shared by the test modules that start servers (a module of its own: `conftest` names collide
between test folders)."""

# Test servers run the bundled model in float32 so that greedy outputs can be compared token for token with
# HF transformers (also float32); a 128K-token pool is enough for every test and starts fast.
SERVER_COMMON = [
    "--dtype", "float32", "--max-running-requests", "16", "--max-total-tokens", "131072", "--log-level", "warning",
]
