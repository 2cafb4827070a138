"""The tritter-comm command: the demo in its short mode, argument errors, bench, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _procs import ROOT, env, run
from tritter_comm import cli


def test_demo_quick(tmp_path):
    out = tmp_path / "demo.png"
    # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the source tree's
    # tritter_comm has no compiled _native after a non-editable install
    p = run([sys.executable, "-m", "tritter_comm", "demo", "--quick", "--out", out],
            timeout=300, cwd=tmp_path)
    table = p.stdout[p.stdout.index("mode "):]
    assert "fp32 all-reduce" in table and "tritter default (int2)" in table
    assert table.count("identical") == 2, p.stdout  # replicas bit-identical in both runs
    assert "[2/2] tritter default (int2)" in p.stdout and "compressing" in p.stdout  # progress shown
    res = {r["mode"]: r for r in json.loads(out.with_suffix(".json").read_text())["results"]}
    assert res["none"]["bytes_per_step"] > 14 * res["tritter"]["bytes_per_step"]  # int2: 15.7x
    assert res["tritter"]["eval_loss"] < res["tritter"]["curve"][0][2]  # it learned
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in p.stdout
    else:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, match", [
    (["demo", "--modes", "none,bogus"], "unknown mode"),
    (["demo", "--steps", "many"], "invalid int value"),
    (["demo", "--start-iter", "1"], "start-iter must be >= 2"),
    (["bench"], "the following arguments are required: NAME"),
    (["bench", "nosuch"], "has no benchmark 'nosuch' (this checkout has: codec, "),
    (["frobnicate"], "invalid choice"),
])
def test_argument_errors_give_usage(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: tritter-comm" in err and match in err


def test_unknown_benchmark_lists_every_runnable_one(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "nosuch"])
    listed = capsys.readouterr().err.split("(this checkout has: ", 1)[1].split(")", 1)[0]
    names = listed.split(", ")
    assert names == sorted(names)
    # scripts with a __main__ block and packages with __main__.py; helpers are left out
    assert {"codec", "convergence", "network", "codec_cuda_sweep"} <= set(names)
    assert "comm" not in names and "results" not in names


def test_no_command_gives_usage(capsys):
    assert cli.main([]) == 2
    assert "usage: tritter-comm" in capsys.readouterr().err


def test_bench_needs_a_source_checkout(tmp_path, capsys):
    assert cli.main(["bench", "--source", str(tmp_path), "convergence"]) == 2
    assert "not installed with the wheel" in capsys.readouterr().err


def test_bench_runs_the_checkout_script(tmp_path):
    p = run([sys.executable, "-m", "tritter_comm", "bench", "--source", ROOT, "convergence",
             "--help"], timeout=120, cwd=tmp_path)
    assert "usage: convergence.py" in p.stdout


def _descendants(pid):
    kids, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == parent and int(d) not in kids:
                    kids.add(int(d))
                    todo.append(int(d))
    return kids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_every_rank(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "tritter_comm", "demo", "--steps", "100000",
                          "--no-plot", "--out", str(tmp_path / "d.png")], env=env(), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        for line in p.stdout:  # wait until the ranks train
            if "ranks ready" in line or time.monotonic() > deadline:
                break
        time.sleep(1)
        ranks = _descendants(p.pid)
        assert len(ranks) >= 2, ranks
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=60)
        rest = p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 130, rest
    assert "interrupted" in rest
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in ranks if _alive(pid)], "ranks outlived the demo"
