"""The request path around SGLang: validation of every generation request (``validation``) and its wiring
into SGLang's HTTP layer, tokenizer manager and scheduler (``hooks``)."""
