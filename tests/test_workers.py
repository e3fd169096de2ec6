"""`engram study --workers N`: the worker command, environment, and the parent that waits and forwards signals."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from engram_lm.cli import main
from engram_lm.experiments.workers import report_command, run_workers, worker_command, worker_env

CHILD = """
import signal, sys, time
def stop(signum, frame):
    print("got SIGTERM, checkpoint saved", flush=True)
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(30)
print("not stopped", flush=True)
"""


def test_worker_command_is_the_same_study_without_a_report():
    cmd = worker_command(seeds=2, out=Path("r/s"), long_data="/d/novels", sections=["allocation-4x", "scaling"],
                         device=None)  # fmt: skip
    assert cmd[:3] == [sys.executable, "-m", "engram_lm"] and cmd[3] == "study"
    args = cmd[4:]
    assert args[args.index("--seeds") + 1] == "2" and args[args.index("--out") + 1] == "r/s"
    assert args[args.index("--report") + 1] == ""  # the parent writes the page once every worker stopped
    assert args[args.index("--sections") + 1] == "allocation-4x,scaling" and "--workers" not in args
    assert "--device" not in args and "--long-data" not in worker_command(seeds=1, out=Path("o"), long_data=None,
                                                                          sections=None, device=None)  # fmt: skip


def test_the_page_is_written_by_a_fresh_interpreter_from_the_finished_runs(tmp_path):
    import json
    import subprocess

    for seed, loss in enumerate((3.80, 3.86, 3.82)):
        folder = tmp_path / "study" / "table-lr" / "mult-1.0" / f"seed-{seed}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({"key": f"table-lr/mult-1.0/seed-{seed}", "table_lr_mult": 1.0,
                                                        "seed": seed, "val_loss": loss, "data": "bible", "epochs": 0.86}))  # fmt: skip
    done = subprocess.run(report_command(tmp_path / "study", tmp_path / "page.md"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| 1.0 | 3.8267 ± 0.0176 |  |  |" in (tmp_path / "page.md").read_text()  # mean and SE of the three


def test_worker_env_gives_one_thread_unless_chosen():
    assert worker_env({"PATH": "/bin"})["OMP_NUM_THREADS"] == "1"
    assert worker_env({"OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "2"


def test_run_workers_waits_for_all_and_reports_exit_codes(tmp_path):
    cmds = [[sys.executable, "-c", "print('one')"], [sys.executable, "-c", "import sys; print('two'); sys.exit(3)"]]
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    lines = []
    codes, stopped = run_workers(cmds, logs, progress=lambda: lines.append("p") or "progress", stagger_s=0.0)
    assert codes == [0, 3] and not stopped
    assert logs[0].read_text() == "one\n" and logs[1].read_text() == "two\n"


def test_a_sigterm_to_the_parent_reaches_every_worker(tmp_path):
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]

    def stop_when_ready():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(p.exists() and "ready" in p.read_text() for p in logs):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    started = time.monotonic()
    previous = signal.getsignal(signal.SIGTERM)
    codes, stopped = run_workers([[sys.executable, "-c", CHILD]] * 2, logs, stagger_s=0.0)
    assert stopped and codes == [130, 130] and time.monotonic() - started < 25
    assert all("got SIGTERM" in p.read_text() and "not stopped" not in p.read_text() for p in logs)
    assert signal.getsignal(signal.SIGTERM) is previous  # the parent's own handler is restored


def test_study_refuses_zero_workers(capsys):
    assert main(["study", "--workers", "0", "--out", "x"]) == 2  # refused before anything is planned or written
    assert "--workers 0: give 1 or more" in capsys.readouterr().err


def test_workers_are_stopped_when_the_parent_fails(tmp_path):
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):  # the second worker cannot start: the first must not be left running
        run_workers([[sys.executable, "-c", CHILD], ["/no/such/program"]], logs, stagger_s=0.5)
    assert time.monotonic() - started < 15  # it waited for the first worker, which would sleep 30 s unless stopped
    assert "not stopped" not in logs[0].read_text()
