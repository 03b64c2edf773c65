"""Synthetic long-context quality suite (RULER / InfiniteBench style), generated locally for any tokenizer.

* :mod:`.tasks`    task builders and :func:`generate_tasks` (deterministic per seed, fitted to a token length)
* :mod:`.scoring`  RULER-style recall / exact scoring of model outputs
* :mod:`.policies` KV policies compared at one device-KV budget (request ``custom_params``)
* :mod:`.run`      the runner: sends tasks to an SGLang server's ``/generate``, writes JSON and a plot
* :mod:`.hf_eval`  the same suite scored with HF transformers greedy decoding (an oracle, no server)
"""
