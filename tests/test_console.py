"""The console contract (`tessera.console`): one line per stage on the console, everything else in the
stage's log, a failure in one line that names its log. The miniature `tessera run`
(`tests/jobs/test_run.py::test_the_console_shows_one_line_per_stage_and_logs_the_rest`) checks it on
the real job graph; these check the parts, without Ray."""

import io
import os
import subprocess
import sys
import time

import pytest

from tessera.console import Console, format_seconds, one_line_cause, progress_text


def test_progress_lines_are_read_through_rays_forwarding_prefix_and_redraws():
    assert progress_text("\x1b[36m(RayTrainWorker pid=123)\x1b[0m [train] all step 3/40 loss 1.0") == "[train] all step 3/40 loss 1.0"
    assert progress_text("(MapWorker(MapBatches(TokenizeActor)) pid=9, ip=10.0.0.1) [tokenize] 12/80") == "[tokenize] 12/80"
    assert progress_text("\r[bpe] merge 1/1024 F=3\r[bpe] merge 9/1024 F=2") == "[bpe] merge 9/1024 F=2"
    assert progress_text("[tessera] normalize ...") == "[tessera] normalize ..."
    for noise in ("2026-11-24 05:54:39,919\tINFO logging_progress.py:225 -- Total Progress: 0/?",
                  "[2026-11-24 05:58:53,895 E 27112 27112] core_worker.cc:2465: Actor ...", "Traceback (most recent call last):", ""):
        assert progress_text(noise) is None
    assert format_seconds(5.2) == "5s" and format_seconds(75) == "1m15s" and format_seconds(3725) == "1h02m"


def test_a_stage_sends_every_writer_to_its_log_and_the_console_gets_one_line_per_stage(tmp_path):
    """Python prints to stdout and stderr, raw writes to fd 1 and 2 and a child process all land in the stage's
    log; the console (not a terminal) shows the stage's progress at most once per interval, its final
    line with the log's path, and the lines printed on purpose, each once."""
    stream = io.StringIO()
    with Console(str(tmp_path / "logs"), stream=stream, interval_s=0.6) as console:
        with console.stage("alpha") as line:
            print("a python print")
            os.write(1, b"a raw write to fd 1\n")
            os.write(2, b"a raw write to fd 2\n")
            subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
            print("a library's complaint", file=sys.stderr)
            for i in range(1, 9):
                print(f"\x1b[36m(RayTrainWorker pid=7)\x1b[0m [train] all step {i}/8 (global {i}/8)", flush=True)
                time.sleep(0.3)
            line.note = "8 steps"
        console.print("a summary line")
        with console.stage("beta"):
            print("quick")
    lines = stream.getvalue().splitlines()
    log = (tmp_path / "logs" / "alpha.log").read_text()
    for text in ("a python print", "a raw write to fd 1", "a raw write to fd 2", "a child process", "a library's complaint",
                 "[train] all step 8/8"):
        assert text in log and text not in stream.getvalue()
    progress = [ln for ln in lines if ln.startswith("[alpha] ") and "done in" not in ln]
    assert 1 <= len(progress) <= 4 and all("[train] all step" in ln for ln in progress), lines
    assert any("ETA" in ln for ln in progress), progress
    done = lines[len(progress)]
    assert done.startswith("[alpha] done in ") and done.endswith(f" · 8 steps · log {tmp_path / 'logs' / 'alpha.log'}")
    assert lines[-2:] == ["a summary line", f"[beta] done in 0s · log {tmp_path / 'logs' / 'beta.log'}"]
    assert len(set(lines)) == len(lines), "every line once"
    assert "quick" in (tmp_path / "logs" / "beta.log").read_text()
    assert "a summary line" in (tmp_path / "logs" / "tessera.log").read_text()


def test_a_failed_stage_says_which_why_in_one_line_and_where_the_traceback_is(tmp_path):
    stream = io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        with Console(str(tmp_path / "logs"), stream=stream) as console:
            with console.stage("train"):
                try:
                    {}["missing"]
                except KeyError as e:
                    raise RuntimeError("Training failed: see the worker's error\nworker traceback ...") from e
    assert exit_info.value.code == 1
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("[train] failed after 0s: KeyError: 'missing' · full log: ")
    log_path = line.rsplit(" ", 1)[1]
    log = open(log_path).read()
    assert "Traceback (most recent call last)" in log and "Training failed: see the worker's error" in log


def test_a_stage_that_exits_with_a_message_says_it_once(tmp_path):
    stream = io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        with Console(str(tmp_path / "logs"), stream=stream) as console:
            with console.stage("synth"):
                raise SystemExit("tessera synth: synth.output must be a local path")
    assert exit_info.value.code == 1, "the status a message exit has, without Python printing the message a second time"
    assert stream.getvalue().splitlines() == [
        f"[synth] failed after 0s: tessera synth: synth.output must be a local path · log {tmp_path / 'logs' / 'synth.log'}"]


def test_the_innermost_cause_is_the_one_line():
    try:
        try:
            raise FileNotFoundError(2, "No such file", "/data/x.tar")
        except FileNotFoundError as e:
            raise RuntimeError("read task failed\n  many lines") from e
    except RuntimeError as outer:
        assert one_line_cause(outer) == "FileNotFoundError: [Errno 2] No such file: '/data/x.tar'"
    assert one_line_cause(ValueError("x" * 500)).endswith("…") and len(one_line_cause(ValueError("x" * 500))) == 200


def test_a_log_directory_on_an_object_store_is_uploaded_after_each_stage(s3_root):
    from tessera import storage

    stream = io.StringIO()
    with Console(f"{s3_root}/logs", stream=stream) as console:
        with console.stage("prepare"):
            print("detail for the object store")
        assert "detail for the object store" in storage.read_text(f"{s3_root}/logs/prepare.log")
    assert stream.getvalue().splitlines() == [f"[prepare] done in 0s · log {s3_root}/logs/prepare.log"]
