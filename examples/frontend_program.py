"""An SGLang frontend program against a running sglang-mux server (unchanged SGLang code).

    make serve &        # or: .venv/bin/python -m sglang_mux.launch_server --port 30000
    .venv/bin/python examples/frontend_program.py --url http://localhost:30000
"""

import argparse

import sglang as sgl


@sgl.function
def describe(s, topic):
    s += "Tell me about " + topic + ". "
    s += sgl.gen("desc", max_tokens=32, temperature=0)
    s += " The colour is " + sgl.select("colour", choices=["red", "blue", "green"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://localhost:30000")
    args = ap.parse_args()
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    state = describe.run(topic="the river")
    print(repr(state["desc"]), state["colour"])
    for st in describe.run_batch([{"topic": "a stone"}, {"topic": "the sky"}]):
        print(repr(st["desc"]), st["colour"])


if __name__ == "__main__":
    main()
