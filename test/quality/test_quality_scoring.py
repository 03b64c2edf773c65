"""Scoring known outputs, the runner end to end with a scripted sender, and the policies' request fields
checked by the server's own request parser."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmark.quality.policies import POLICIES, PolicyError, budget_tokens, custom_params, leaves_spec, parse_policies
from benchmark.quality.run import main, markdown_table, run_suite
from benchmark.quality.scoring import exact, recall
from benchmark.quality.tasks import generate_tasks


def test_recall_and_exact_on_known_outputs():
    assert recall(" 123456.", ["123456"]) == 1.0
    assert recall("the number is 12345", ["123456"]) == 0.0
    assert recall(" 111111, 222222, 999999.", ["111111", "222222", "333333", "444444"]) == 0.5
    assert exact(" 111111, 222222, 999999.", ["111111", "222222"]) == 1.0
    assert exact(" 111111", ["111111", "222222"]) == 0.0
    assert recall(" FALCON coral", ["falcon", "CORAL"]) == 1.0  # case-insensitive like RULER
    assert recall(" 000000\n123456", ["123456"]) == 0.0  # only the first line counts
    with pytest.raises(ValueError, match="answers"):
        recall("x", [])


def _args(tmp_path, **kw):
    a = dict(url="http://unused", task_list=["niah_single", "vt", "cwe"], length_list=[512], policy_list=["full", "streaming"],
             samples=4, seed=0, budget=None, budget_frac=0.125, concurrency=2, out=str(tmp_path))
    a.update(kw)
    return argparse.Namespace(**a)


def test_runner_scores_scripted_outputs(tmp_path):
    """Perfect outputs for 'full', the first half of the answers for 'streaming': the table must say 1.0 / 0.5."""
    from transformers import AutoTokenizer

    from sglang_mux.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    samples = {s.prompt: s for t in ("niah_single", "vt", "cwe") for s in generate_tasks(t, tok, 512, 4, 0)}
    seen = []

    def send(url, prompt, max_new, params):
        s = samples[prompt]
        seen.append(params)
        if params.get("mux_exact"):
            return s.completion
        k = len(s.answers) // 2
        return " " + " ".join(s.answers[:k]) if k else " wrong"

    result = run_suite(_args(tmp_path), tok, send=send, progress=False)
    cells = {(r["policy"], r["task"]): r for r in result["results"]}
    assert all(cells[("full", t)]["exact"] == 1.0 for t in ("niah_single", "vt", "cwe"))
    assert cells[("streaming", "niah_single")]["recall"] == 0.0
    assert cells[("streaming", "vt")]["recall"] == pytest.approx(2 / 5)
    assert cells[("streaming", "cwe")]["recall"] == 0.5
    # budgets: 1/8 of each prompt, sent with the StreamingLLM split
    stream = [p for p in seen if "mux_budget" in p]
    assert all(p["mux_leaves"] == leaves_spec("streaming", p["mux_budget"]) for p in stream)
    per_cell = json.loads((tmp_path / "streaming" / "niah_single_512.json").read_text())
    assert [r["budget"] for r in per_cell["samples"]] == [-(-r["n_tokens"] // 8) for r in per_cell["samples"]]
    md = markdown_table(result["results"])
    assert "| vt | 512 | 1.00 | 0.40 |" in md
    from benchmark.quality.run import mean_table

    means = mean_table(result["results"])
    assert "| full | 1.000 | 1.000 |" in means and f"| streaming | {(0 + 0.4 + 0.5) / 3:.3f} |" in means


def test_several_budget_fractions_run_every_budgeted_policy_at_each_and_full_once(tmp_path):
    from transformers import AutoTokenizer

    from benchmark.quality.run import arms, build_parser
    from sglang_mux.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    sent = []

    def send(url, prompt, max_new, params):
        sent.append(params)
        return " nothing"

    args = _args(tmp_path, task_list=["niah_single"], budget_frac=[0.125, 0.0625], samples=2)
    assert [label for _, _, label in arms(args)] == ["full", "streaming@1/8", "streaming@1/16"]
    result = run_suite(args, tok, send=send, progress=False)
    assert [r["policy"] for r in result["results"]] == ["full", "streaming@1/8", "streaming@1/16"]
    assert [r["budget_frac"] for r in result["results"]] == [None, 0.125, 0.0625]
    assert sum("mux_exact" in p for p in sent) == 2 and len(sent) == 6
    for label, div in (("streaming@1/8", 8), ("streaming@1/16", 16)):
        cell = json.loads((tmp_path / label.replace("/", "_") / "niah_single_512.json").read_text())
        assert [r["budget"] for r in cell["samples"]] == [-(-r["n_tokens"] // div) for r in cell["samples"]]
    from benchmark.quality.run import means_by_arm, plot_means

    scored = [dict(r, recall=v) for r, v in zip(result["results"], (1.0, 0.5, 0.25))]
    assert means_by_arm(scored) == {("full", None): 1.0, ("streaming", 0.125): 0.5, ("streaming", 0.0625): 0.25}
    plot_means(scored, tmp_path / "means.png", "t")
    assert (tmp_path / "means.png").stat().st_size > 1000
    assert build_parser().parse_args(["--budget-frac", "0.25,0.125"]).budget_frac == [0.25, 0.125]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--budget-frac", "a,b"])


def test_policy_fields_accepted_by_the_server_parser():
    from sglang_mux.request_options import parse_request_options

    for budget in (40, 256, 4096):
        for policy in POLICIES:
            opts = parse_request_options(custom_params(policy, budget))
            assert opts.exact == (policy == "full")
            if policy != "full":
                assert opts.budget == budget and opts.leaves == leaves_spec(policy, budget)
    assert parse_request_options(custom_params("quest", 256)).retrieval_score == "bound"
    assert parse_request_options(custom_params("quest_mass", 256)).retrieval_score == "mass"
    assert parse_request_options(custom_params("mux", 256)).retrieval_score is None  # the server's default
    assert leaves_spec("streaming", 4096) == "sink=64,recent=rest"
    assert leaves_spec("streaming", 62) == "sink=15,recent=rest"
    assert leaves_spec("snapkv", 256) == "sink=16,heavy=rest"
    assert leaves_spec("quest", 256) == "sink=16,retrieval=rest"
    assert leaves_spec("mux", 256) is None
    adaptive_chunk = parse_request_options(custom_params("adaptive_chunk", 256))
    assert adaptive_chunk.router == "adaptive" and adaptive_chunk.leaves == leaves_spec("mux_chunk", 256)
    assert parse_request_options(custom_params("learned", 256)).router == "learned"
    int4 = parse_request_options(custom_params("mux_int4_pyramid", 256))
    assert (int4.cold_bits, int4.layer_budget, int4.leaves) == (4, "pyramid", None)


def test_budget_and_policy_errors():
    assert budget_tokens(1000, None, 0.125) == 125
    assert budget_tokens(1000, 300, None) == 300
    with pytest.raises(PolicyError, match="--budget-frac"):
        budget_tokens(1000, None, 1.5)
    with pytest.raises(PolicyError, match="--policies: unknown 'h2o'; allowed: full, streaming"):
        parse_policies("full,h2o")


def test_cli_bad_input_is_one_line(capsys):
    assert main(["--policies", "nope"]) == 2
    assert main(["--lengths", "1k"]) == 2
    assert main(["--url", "http://127.0.0.1:9", "--tokenizer", "unused", "--tasks", "vt", "--samples", "0"]) == 2
    # a port of the user's would win in SGLang's parser while the runner waits on its own: refused at once
    assert main(["--launch", "--dtype float32 --port 30123", "--tasks", "vt", "--samples", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --policies: unknown 'nope'; allowed: full, streaming, snapkv, quest, quest_mass, chunk, mux, mux_chunk, "
        "mux_chunk_shared, mux_both, mux_pyramid, mux_adaptive, adaptive, learned, adaptive_chunk, mux_int8, mux_int4, mux_int2, "
        "mux_int4_pyramid, mux_int4_adaptive",
        "error: --lengths: expected comma-separated token counts like 1024,2048, got '1k'",
        "error: --samples: must be >= 1, got 0",
        "error: --launch: server args: --port not allowed here; the server gets a free port on 127.0.0.1 "
        "(pass port= to choose one)",
    ]


def test_plot_sweep_tables_the_runs_and_rejects_bad_points(tmp_path, capsys):
    from benchmark.quality.plot_sweep import main as sweep_main

    def run(folder, policy, recalls):
        (tmp_path / folder).mkdir()
        res = [{"policy": policy, "task": "niah_single", "length": n, "recall": r} for n, r in recalls.items()]
        (tmp_path / folder / "summary.json").write_text(json.dumps({"results": res}))

    run("a", "mux", {1024: 0.5, 2048: 0.25})
    run("b", "mux", {1024: 1.0, 2048: 0.75})
    run("ref", "full", {1024: 1.0, 2048: 1.0})
    out = tmp_path / "sweep.png"
    assert sweep_main([f"10={tmp_path / 'b'}", f"1={tmp_path / 'a'}", "--reference", str(tmp_path / "ref"),
                       "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 1000
    assert "| 1 | 0.50 | 0.25 |" in text and "| 10 | 1.00 | 0.75 |" in text and "| full KV | 1.00 | 1.00 |" in text
    assert text.index("| 1 |") < text.index("| 10 |")  # sorted by value
    assert sweep_main(["ten", "--out", str(out)]) == 2
    assert sweep_main([f"1={tmp_path / 'missing'}", "--out", str(out)]) == 2
    assert sweep_main([f"1={tmp_path / 'a'}", "--policy", "quest", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "expected VALUE=DIR" in err and "not a runner summary" in err and "no results for policy 'quest'" in err


def test_plot_lengths_merges_tables_per_label_and_rejects_bad_ones(tmp_path, capsys):
    from benchmark.quality.plot_lengths import as_results, load_tables, main as lengths_main

    (tmp_path / "a.json").write_text(json.dumps({"vt": {"1024": {"exact": 0.5, "recall": 0.75, "n": 4}}}))
    (tmp_path / "b.json").write_text(json.dumps({"vt": {"8192": {"exact": 0.25, "recall": 0.5, "n": 4}}}))
    label, table = load_tables(f"YaRN x4={tmp_path / 'a.json'},{tmp_path / 'b.json'}")
    assert label == "YaRN x4" and table == {"vt": {"1024": {"exact": 0.5, "recall": 0.75}, "8192": {"exact": 0.25, "recall": 0.5}}}
    rows = sorted(as_results([(label, table)]), key=lambda r: r["length"])
    assert [(r["policy"], r["task"], r["length"], r["exact"]) for r in rows] == [("YaRN x4", "vt", 1024, 0.5), ("YaRN x4", "vt", 8192, 0.25)]
    out = tmp_path / "lengths.png"
    assert lengths_main([f"plain={tmp_path / 'a.json'}", f"yarn={tmp_path / 'b.json'}", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    (tmp_path / "bad.json").write_text(json.dumps({"vt": {"1024": {"n": 4}}}))
    assert lengths_main([str(tmp_path / "a.json"), "--out", str(out)]) == 2
    assert lengths_main([f"x={tmp_path / 'bad.json'}", "--out", str(out)]) == 2
    assert lengths_main([f"x={tmp_path / 'missing.json'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "expected LABEL=FILE.json" in err and "bad.json: not an hf_eval --out table" in err and "missing.json" in err
