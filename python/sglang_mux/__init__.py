"""sglang-mux: SGLang with a leaf-spine multiplexed KV memory.

Importing this package is cheap and never imports SGLang; `sglang_mux.plugin.register` wires us into
SGLang through its plugin entry point (see docs/architecture.md).
"""

__version__ = "0.1.0"
