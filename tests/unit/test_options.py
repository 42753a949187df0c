"""Each command's options are defined once: the fab task and its python -m twin agree on every one."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from llama3_ops import cli
from llama3_ops.stages import agent_finetune, chat, finetune, llava, quantize, serve
from llama3_ops.stages.options import Opt, OptionError, values

ROOT = Path(__file__).resolve().parents[2]


def _fabfile() -> object:
    spec = importlib.util.spec_from_file_location("fabfile_under_test", ROOT / "fabfile.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TWINS = {"serve": serve, "chat": chat, "quantize": quantize, "llava": llava, "finetune": finetune,
         "agent_finetune": agent_finetune}


@pytest.mark.parametrize("task", sorted(TWINS))
def test_fab_task_and_twin_take_the_same_options(task: str) -> None:
    fab = getattr(_fabfile(), task)
    opts: tuple[Opt, ...] = TWINS[task].OPTIONS
    params = fab.argspec(fab.body).parameters
    for o in opts:
        assert params[o.name].default == o.default, o.name
        assert fab.help[o.name] == o.help_text and o.help, o.name
    # the twin's parser: same flags and defaults
    if task == "serve":
        parser_defaults = vars(serve.build_parser().parse_args(["up"]))
    else:
        argv = ["--local", "--image", "x.png"] if task == "llava" else ["--local"]
        build = getattr(TWINS[task], "build_parser", None)
        parser = build() if build else finetune.local_parser("p", task, opts)
        parser_defaults = vars(parser.parse_args(argv))
    for o in opts:
        if o.name != "image":
            assert parser_defaults[o.name] == o.default, o.name


def test_every_fab_task_documents_every_option() -> None:
    fab = _fabfile()
    from invoke.tasks import Task

    tasks = [v for v in vars(fab).values() if isinstance(v, Task)]
    assert len(tasks) == 15
    for t in tasks:
        names = set(t.argspec(t.body).parameters)
        assert names <= set(t.help), f"{t.name}: no help for {sorted(names - set(t.help))}"


def test_bad_values_are_one_line_naming_the_option() -> None:
    with pytest.raises(OptionError, match=r"--backend must be one of turbomind, pytorch; got 'tm'"):
        values(chat.OPTIONS, {"backend": "tm"})
    with pytest.raises(OptionError, match=r"--session-len takes a int, not 'long'"):
        values(chat.OPTIONS, {"session_len": "long"})
    assert values(chat.OPTIONS, {"cache_max_entry_count": "0.01"}).cache_max_entry_count == 0.01


def test_the_llama3_ops_entry_point_runs_the_twins(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2 and "serve" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["chat", "--help"])
    assert exc.value.code == 0 and "--cache-max-entry-count" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "llama3_ops", "llava", "--local"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == \
        "error: --image is required: a local image file or an http(s) URL"
    assert "Traceback" not in proc.stderr


def test_fab_errors_are_one_line_without_a_traceback(tmp_path: Path) -> None:
    """What a user types, as they type it: an unknown host, a bad option value (exit 1, one line, the fix)."""
    fab = [str(Path(sys.executable).parent / "fab"), "-r", str(ROOT)]
    env = {**__import__("os").environ, "LLAMA3_INVENTORY": str(ROOT / "inventory" / "example.yml")}
    for args, line in (
        (["-H", "nosuchhost.invalid", "status"], "error: cannot resolve host 'nosuchhost.invalid': it is neither in "
                                                  "your inventory"),
        (["-H", "gpu1", "serve", "--engine", "vllm"], "error: --engine must be one of lmdeploy, transformers; got "
                                                      "'vllm'"),
    ):
        proc = subprocess.run([*fab, *args], capture_output=True, text=True, timeout=120, check=False, env=env,
                              cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().startswith(line) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
