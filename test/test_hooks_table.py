"""The SGLang hooks table (sglang_mux/sglang_hooks.py): upgrade tripwire, startup check, installers (no server).

* Tripwire: every target of the table exists in the installed SGLang, with the shape its kind needs.
* ``check_installed`` names the target in one line when a target is missing or a hook did not take effect
  (checked on a stand-in module, so SGLang itself is never patched in this process).
* ``plugin.register()`` called before ``load_plugins()`` (in a fresh interpreter) applies every hook it
  registered, the PD bootstrap check on ``/generate`` included (it used to be skipped in that order).
* docs/architecture.md shows the table as it is.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from sglang_mux import sglang_hooks
from sglang_mux.sglang_hooks import (
    HOOKS,
    REGISTRY_KINDS,
    ROUTE,
    SETATTR,
    HookCheckError,
    SGLangHook,
    check_installed,
    hook_function,
    resolve_target,
)

ROOT = Path(__file__).resolve().parents[1]
INSTALLER_GROUPS = {"router", "stats-route", "validation-edge", "validation-tokenizer", "validation-scheduler",
                    "pd-bootstrap", "pd-heavy-scores", "pd-cpu", "pd-cpu-runtime"}


def test_table_covers_every_target_once_per_hook():
    targets = {h.target for h in HOOKS}
    assert len(HOOKS) == 24 and len(targets) == 19  # 22 HookRegistry hooks on 17 targets, a route, a setattr
    assert len({(h.target, h.hook) for h in HOOKS}) == len(HOOKS)
    assert {h.group for h in HOOKS} == INSTALLER_GROUPS
    assert all(h.kind in (*REGISTRY_KINDS, ROUTE, SETATTR) for h in HOOKS)
    assert all(h.why and h.breaks for h in HOOKS)


@pytest.mark.parametrize("record", HOOKS, ids=lambda h: f"{h.kind}:{h.target.replace('sglang.srt.', '')}")
def test_target_exists_in_sglang(record: SGLangHook):
    """Upgrade tripwire: SGLang still has every target under that name, with the shape the hook needs."""
    live = resolve_target(record.target)
    fn = hook_function(record)
    assert callable(fn)
    if record.kind in REGISTRY_KINDS:
        assert callable(live) and not inspect.isclass(live), record.target
    elif record.kind == ROUTE:
        assert hasattr(live, "add_api_route") and hasattr(live.router, "routes")
    else:
        assert isinstance(live, bool)  # SETATTR: a class flag we set to False


def test_private_sglang_names_the_check_relies_on():
    from sglang.srt.entrypoints import http_server
    from sglang.srt.plugins.hook_registry import HookRegistry, _current_plugin_source

    assert isinstance(HookRegistry._patched, set) and _current_plugin_source.get() is None
    assert hasattr(http_server, "_global_state") and callable(http_server.get_global_state)


# ------------------------------------------------------------------ the startup check, on a stand-in module
FAKE = "mux_fake_sglang_target"


def around(original, *args, **kwargs):
    return ("around", original(*args, **kwargs))


def after(result, *args, **kwargs):
    return ("after", result)


@pytest.fixture
def fake_target(monkeypatch):
    """A module ``mux_fake_sglang_target`` with one function, ``serve``; HookRegistry's state is restored after."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    mod = types.ModuleType(FAKE)
    mod.serve = lambda x: x + 1
    mod.around, mod.after = around, after
    monkeypatch.setitem(sys.modules, FAKE, mod)
    hooks, patched = {k: list(v) for k, v in HookRegistry._hooks.items()}, set(HookRegistry._patched)
    yield mod
    HookRegistry._hooks.clear()
    HookRegistry._hooks.update(hooks)
    HookRegistry._patched.clear()
    HookRegistry._patched.update(patched)


def record(kind: str, hook: str, target: str = f"{FAKE}.serve") -> SGLangHook:
    return SGLangHook(target, kind, f"{FAKE}:{hook}", "test", "why", "breaks")


def test_applied_hooks_pass_the_check(fake_target):
    from sglang.srt.plugins.hook_registry import HookRegistry

    records = sglang_hooks.register_hooks([record("AROUND", "around"), record("AFTER", "after")])
    HookRegistry.apply_hooks()
    check_installed(records, applied=True)
    assert fake_target.serve(1) == ("after", ("around", 2))


def test_missing_target_is_one_line_naming_it(fake_target):
    with pytest.raises(HookCheckError) as e:
        check_installed([record("AROUND", "around", target=f"{FAKE}.renamed")], applied=False)
    assert f"{FAKE}.renamed not found" in str(e.value) and "\n" not in str(e.value)


def test_hook_registered_after_its_target_was_patched_is_caught(fake_target):
    """HookRegistry skips a target it already patched: the registration-order bug, now an error naming it."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    sglang_hooks.register_hooks([record("AROUND", "around")])
    HookRegistry.apply_hooks()
    late = sglang_hooks.register_hooks([record("AFTER", "after")])
    HookRegistry.apply_hooks()
    assert fake_target.serve(1) == ("around", 2)  # SGLang skipped the late hook, silently
    for applied in (True, False):
        with pytest.raises(HookCheckError, match=f"AFTER hook {FAKE}:after on SGLang target {FAKE}.serve"):
            check_installed(late, applied=applied)


# ------------------------------------------------------------------ the real plugin, in a fresh interpreter
REGISTER_FIRST = """
import json, pkgutil
from sglang_mux import plugin, sglang_hooks
from sglang_mux.platform import has_cuda_gpu
plugin.register()  # before load_plugins(), as a program using sglang-mux directly may do
from sglang.srt.plugins import load_plugins
load_plugins()
plugin.register()
out = {}
for h in sglang_hooks.HOOKS:
    if h.kind in sglang_hooks.REGISTRY_KINDS and not (h.group == "pd-cpu" and has_cuda_gpu()):
        live = sglang_hooks.resolve_target(h.target)
        out[h.target + " " + h.hook] = sglang_hooks.hook_reaches(live, sglang_hooks.hook_function(h))
print("RESULT" + json.dumps(out))
"""


def test_register_before_load_plugins_applies_every_hook():
    run = subprocess.run([sys.executable, "-c", REGISTER_FIRST], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    reached = json.loads(run.stdout.split("RESULT", 1)[1])
    assert len(reached) >= 16
    assert [k for k, ok in reached.items() if not ok] == []
    assert reached[f"{sglang_hooks.HTTP_GENERATE} sglang_mux.disagg.hooks:reject_malformed_bootstrap"]


def test_docs_show_the_table():
    assert sglang_hooks.markdown_table() in (ROOT / "docs" / "architecture.md").read_text()
