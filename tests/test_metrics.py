"""The progress line's ETA counts only the steps this process ran: a run resumed at step 900 of
1000 that took 1 s for 10 steps has 9 s left, not 0.1 s."""

import logging

from sora_dist import metrics


def test_eta_after_a_resume_uses_this_processes_steps(tmp_path, monkeypatch, caplog):
    clock = iter([0.0, 100.0, 101.0])  # logger created, resumed at step 900, step 910 logged
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    logger = metrics.MetricsLogger(tmp_path, total_steps=1000, tensorboard=False)
    logger.resumed_at(900)
    values = dict(loss=0.1, grad_norm=1.0, lr=1e-4, samples_per_s=1.0, tokens_per_s=1.0, data_wait_frac=0.0)
    with caplog.at_level(logging.INFO, logger="sora_dist"):
        logger.log(910, values)
    assert "elapsed 0m01s | ETA 0m09s" in caplog.text


def test_progress_line_logs_about_every_tenth_with_eta(monkeypatch, caplog):
    clock = iter([0.0] + [float(i) for i in range(1, 31)])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    progress = metrics.ProgressLine("sampling", parts=3)
    with caplog.at_level(logging.INFO, logger="sora_dist"):
        for done in range(1, 31):
            progress(done, 30)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "sampling: 10/30 (33%) | elapsed 0m01s | ETA 0m02s",
        "sampling: 20/30 (67%) | elapsed 0m02s | ETA 0m01s",
        "sampling: 30/30 (100%) | elapsed 0m03s | ETA 0m00s",
    ]
