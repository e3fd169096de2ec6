"""The thread governor: the cores other processes leave, from synthetic CPU readings."""

import pytest

from engram_lm.training.threads import CpuSample, ThreadGovernor, busy_elsewhere, read_cpu, threads_for


@pytest.mark.parametrize("cores, elsewhere, expected", [
    (2, 0.0, 2), (2, 0.3, 2), (2, 0.6, 1), (2, 0.67, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 5.0, 1),
    (8, 0.0, 8), (8, 2.4, 6), (8, 2.6, 5), (1, 0.0, 1),
])  # fmt: skip
def test_threads_are_the_cores_left_rounded_and_at_least_one(cores, elsewhere, expected):
    assert threads_for(cores, elsewhere) == expected


def test_busy_elsewhere_is_the_machines_busy_time_less_this_processs():
    before = CpuSample(wall_s=10.0, machine_busy_s=100.0, own_cpu_s=50.0)
    # 4 s: the machine was busy 7 core-seconds, 3 of them ours -> 1 core elsewhere
    assert busy_elsewhere(before, CpuSample(14.0, 107.0, 53.0)) == pytest.approx(1.0)
    assert busy_elsewhere(before, CpuSample(14.0, 102.0, 53.0)) == 0.0  # tick rounding: never negative
    assert busy_elsewhere(before, before) == 0.0


class _Machine:
    """Readings of a 2-core machine where other processes hold `others` cores and we run 1.5."""

    def __init__(self) -> None:
        self.t, self.busy, self.own, self.others = 0.0, 0.0, 0.0, 0.0

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.busy += (self.others + 1.5) * seconds
        self.own += 1.5 * seconds

    def read(self) -> CpuSample:
        return CpuSample(self.t, self.busy, self.own)


def test_the_governor_steps_down_while_others_hold_a_core_and_back_up_after():
    machine, set_to = _Machine(), []
    gov = ThreadGovernor(every_s=5.0, cores=2, read=machine.read, set_threads=set_to.append, enabled=True)
    gov.threads = 2
    machine.advance(1.0)
    assert gov.tick(machine.t) is None  # not due yet: no reading, no change
    machine.others = 1.0
    machine.advance(5.0)
    assert gov.tick(machine.t) == 1 and set_to == [1]
    machine.advance(5.0)
    assert gov.tick(machine.t) is None  # still shared: unchanged, nothing set again
    machine.others = 0.05
    machine.advance(5.0)
    assert gov.tick(machine.t) == 2 and set_to == [1, 2]
    assert [t for t, _ in gov.changes] == [1, 2] and gov.changes[0][1] == pytest.approx(0.8, abs=0.21)


def test_a_thread_count_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    machine, set_to = _Machine(), []
    gov = ThreadGovernor(every_s=1.0, cores=2, read=machine.read, set_threads=set_to.append)
    machine.others = 2.0
    machine.advance(3.0)
    assert not gov.enabled and gov.tick(machine.t) is None and set_to == []


def test_this_machine_gives_readings_that_count_this_processs_own_work():
    before = read_cpu()
    if before is None:
        pytest.skip("no /proc/stat here")
    x = sum(i * i for i in range(2_000_000))  # about 0.1 s of this process's CPU
    after = read_cpu()
    assert x > 0 and after.own_cpu_s > before.own_cpu_s and after.machine_busy_s >= before.machine_busy_s


def test_the_progress_line_gives_the_whole_jobs_eta_when_runs_follow(capsys):
    from engram_lm.training.run import Progress

    Progress("moe", 10, every=5, later_steps=10).update(5, 3.0, 100.0, 150.0)
    Progress("moe+engram", 10, every=5).update(5, 3.0, 100.0, 50.0, " (1 of 2 cores: the machine is shared)")
    first, second = capsys.readouterr().err.splitlines()
    assert first.endswith("ETA 2:30 (whole job)")
    assert second.endswith("ETA 0:50 (1 of 2 cores: the machine is shared)")


def test_a_cpu_training_run_logs_each_thread_change(tmp_path, monkeypatch):
    """The loop ticks the governor every step and writes its decisions to metrics.jsonl."""
    import json

    from engram_lm.recipes import tiny
    from engram_lm.training import loop

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    decisions = iter([1, None, 2])

    class Scripted(ThreadGovernor):
        def tick(self, now_s=None):
            threads = next(decisions, None)
            if threads is not None:
                self.threads = threads
                self.changes.append((threads, 0.9 if threads == 1 else 0.0))
            return threads

    monkeypatch.setattr(loop, "process_governor", lambda: Scripted(cores=2, enabled=True))
    model_cfg, train_cfg = tiny()
    loop.train(model_cfg, train_cfg.with_(steps=4), tmp_path / "run", progress=False)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["threads"], e["busy_elsewhere"]) for e in events if e.get("event") == "threads"] == [
        (1, 1, 0.9), (3, 2, 0.0)]


def test_runs_in_one_process_share_one_governor_whose_ceiling_is_torchs_count_before_any_run():
    import torch

    from engram_lm.training import threads

    before = torch.get_num_threads()
    try:
        threads._PROCESS_GOVERNOR = None
        first = threads.process_governor()
        torch.set_num_threads(1)  # as a first run's governor would on a shared machine
        assert threads.process_governor() is first and first.cores == min(threads.usable_cores(), before)
    finally:
        threads._PROCESS_GOVERNOR = None
        torch.set_num_threads(before)
