"""Settings shared by the test modules that start servers (a module of its own: `conftest` names collide
between test folders)."""

# Test servers run the bundled model in float32 so that greedy outputs can be compared token for token with
# HF transformers (also float32); a 128K-token pool is enough for every test and starts fast.
SERVER_COMMON = [
    "--dtype", "float32", "--max-running-requests", "16", "--max-total-tokens", "131072", "--log-level", "warning",
]


def hf_greedy_ignore_eos(model, ids: list[int], n: int) -> list[int]:
    """HF transformers' greedy continuation of ``ids`` for exactly ``n`` tokens, as SGLang's ``ignore_eos`` makes
    it: an end token may be chosen and generation goes on. (``generate(min_new_tokens=n)`` is not this oracle: it
    bans the end token, so it differs from the server wherever the model's top choice is that token.)"""
    import torch

    out, past, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            r = model(input_ids=step, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            step = torch.tensor([[nxt]])
    return out
