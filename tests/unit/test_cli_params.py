"""The command line's shared parts: argument types, service options, the stop-on-signal runner, and the
launchers' one rule for pid files."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from beamstream.cli import params
from beamstream.cli.main import build_parser, main
from beamstream.cli.service import run_stoppable, start_service
from beamstream.errors import BeamstreamError
from beamstream.operations.cluster import ClusterError, LocalCluster
from beamstream.operations.registry import LocalRegistry
from beamstream.platform.processes import PidFile, require_free_ports
from beamstream.platform.settings import Settings

# -- argument types ----------------------------------------------------------------------------

GOOD = [
    (params.positive_int, "1", 1), (params.positive_int, " 42 ", 42),
    (params.non_negative_int, "0", 0), (params.non_negative_int, "7", 7),
    (params.positive_float, "0.5", 0.5), (params.positive_float, "20", 20.0),
    (params.non_negative_float, "0", 0.0), (params.non_negative_float, "1e-3", 0.001),
    (params.port_number, "1", 1), (params.port_number, "65535", 65535),
    (params.port_or_zero, "0", 0), (params.port_or_zero, "8080", 8080),
    (params.dcid, "12345", 12345),
    (params.batch_size, "1", 1), (params.batch_size, "100000", 100_000),
    (params.seconds_up_to_a_minute, "0.2", 0.2), (params.seconds_up_to_a_minute, "60", 60.0),
    (params.detector_name, "eiger2-4m", "eiger2_4m"),
]

BAD = [
    (params.positive_int, "0", "must be at least 1, got 0"),
    (params.positive_int, "-3", "must be at least 1, got -3"),
    (params.positive_int, "2.5", "expected a whole number, got '2.5'"),
    (params.positive_int, "many", "expected a whole number, got 'many'"),
    (params.non_negative_int, "-1", "must be 0 or more, got -1"),
    (params.non_negative_int, "", "expected a whole number, got ''"),
    (params.positive_float, "0", "must be more than 0, got 0"),
    (params.positive_float, "-0.1", "must be more than 0, got -0.1"),
    (params.positive_float, "inf", "expected a finite number, got 'inf'"),
    (params.positive_float, "fast", "expected a number, got 'fast'"),
    (params.non_negative_float, "-1", "must be 0 or more, got -1"),
    (params.non_negative_float, "nan", "expected a finite number, got 'nan'"),
    (params.port_number, "0", "expected a port number (1-65535), got '0'"),
    (params.port_number, "70000", "expected a port number (1-65535), got '70000'"),
    (params.port_number, "http", "expected a port number (1-65535), got 'http'"),
    (params.port_or_zero, "-1", "expected a port number (0-65535; 0 picks a free one), got '-1'"),
    (params.port_or_zero, "65536", "expected a port number (0-65535; 0 picks a free one), got '65536'"),
    (params.dcid, "0", "a dcid is positive, got 0"),
    (params.dcid, "twelve", "a dcid is a whole number, got 'twelve'"),
    (params.batch_size, "0", "must be between 1 and 100000, got 0"),
    (params.batch_size, "100001", "must be between 1 and 100000, got 100001"),
    (params.seconds_up_to_a_minute, "0", "must be more than 0 and at most 60 seconds, got 0"),
    (params.seconds_up_to_a_minute, "61", "must be more than 0 and at most 60 seconds, got 61"),
    (params.seconds_up_to_a_minute, "soon", "expected a number of seconds, got 'soon'"),
    (params.iso_time, "yesterday", "expected an ISO 8601 time like 2026-01-31T14:05:00Z, got 'yesterday'"),
    (params.iso_time, "2026-13-01", "expected an ISO 8601 time"),
    (params.detector_name, "pilatus9000", "unknown detector 'pilatus9000'"),
]


@pytest.mark.parametrize(("parse", "text", "expected"), GOOD)
def test_a_good_value_is_converted(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(("parse", "text", "message"), BAD)
def test_a_bad_value_is_an_argument_type_error_saying_what_was_wrong(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        parse(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_iso_times_are_aware_and_zoneless_ones_are_local():
    assert params.iso_time("2026-01-31T14:05:00Z") == datetime(2026, 1, 31, 14, 5, tzinfo=UTC)
    zoneless = params.iso_time("2026-01-31T14:05")
    assert zoneless.tzinfo is not None
    assert zoneless.utcoffset() == datetime(2026, 1, 31, 14, 5).astimezone().utcoffset()
    assert params.iso_time("2026-01-31T14:05:00+01:00").utcoffset() == timedelta(hours=1)


# -- one-line errors from real command lines --------------------------------------------------

COMMAND_LINES = [
    (["worker", "--retries", "0"], "beamstream worker", "argument --retries: must be at least 1, got 0"),
    (["worker", "--retries", "-2"], "beamstream worker", "argument --retries: must be at least 1, got -2"),
    (["worker", "--retries", "three"], "beamstream worker", "argument --retries: expected a whole number, got 'three'"),
    (["worker", "--summary-timeout", "-1"], "beamstream worker", "argument --summary-timeout: must be 0 or more"),
    (["worker", "--threads", "0"], "beamstream worker", "argument --threads: must be at least 1, got 0"),
    (["worker", "--threads", "-3"], "beamstream worker", "argument --threads: must be at least 1, got -3"),
    (["worker", "--threads", "many"], "beamstream worker", "argument --threads: expected a whole number, got 'many'"),
    (["worker", "--stall-limit", "0"], "beamstream worker", "argument --stall-limit: must be more than 0, got 0"),
    (["worker", "--answered-retention", "-3"], "beamstream worker",
     "argument --answered-retention: must be more than 0, got -3"),
    (["worker", "--retry-backoff", "x"], "beamstream worker", "argument --retry-backoff: expected a number, got 'x'"),
    (["worker", "--simulated-analysis-time", "-0.5"], "beamstream worker",
     "argument --simulated-analysis-time: must be 0 or more"),
    (["worker", "--metrics-port", "0"], "beamstream worker", "argument --metrics-port: expected a port number"),
    (["monitor", "--interval", "0"], "beamstream monitor", "argument --interval: must be more than 0, got 0"),
    (["monitor", "--min-workers", "-1"], "beamstream monitor", "argument --min-workers: must be 0 or more"),
    (["monitor", "--max-workers", "0"], "beamstream monitor", "argument --max-workers: must be at least 1"),
    (["monitor", "--lag-per-worker", "0"], "beamstream monitor", "argument --lag-per-worker: must be at least 1"),
    (["monitor", "--scale-down-after", "-5"], "beamstream monitor", "argument --scale-down-after: must be 0 or more"),
    (["archiver", "--metrics-port", "70000"], "beamstream archiver",
     "argument --metrics-port: expected a port number (1-65535), got '70000'"),
    (["feedback", "--udp", "gda:9877", "--metrics-port", "x"], "beamstream feedback",
     "argument --metrics-port: expected a port number"),
    (["ispyb-sink", "--batch-size", "0"], "beamstream ispyb-sink", "argument --batch-size: must be between 1 and"),
    (["ispyb-sink", "--batch-wait", "0"], "beamstream ispyb-sink", "argument --batch-wait: must be more than 0"),
    (["watch", "--dcid", "1", "--template", "/d/x_####.cbf", "--images", "0"], "beamstream watch",
     "argument --images: must be at least 1, got 0"),
    (["watch", "--dcid", "-4", "--template", "/d/x_####.cbf", "--images", "3"], "beamstream watch",
     "argument --dcid: a dcid is positive, got -4"),
    (["watch", "--dcid", "1", "--template", "/d/x_####.cbf", "--images", "3", "--poll", "0"], "beamstream watch",
     "argument --poll: must be more than 0"),
    (["simulate", "gridscan", "--rows", "0", "--cols", "3"], "beamstream simulate gridscan",
     "argument --rows: must be at least 1, got 0"),
    (["simulate", "rotation", "--images", "3", "--width", "-0.1"], "beamstream simulate rotation",
     "argument --width: must be 0 or more"),
    (["go", "twelve"], "beamstream go", "argument DCID: a dcid is a whole number, got 'twelve'"),
    (["demo", "--workers", "0"], "beamstream demo", "argument --workers: must be at least 1, got 0"),
    (["demo", "--rate", "-20"], "beamstream demo", "argument --rate: must be more than 0"),
    (["dashboard", "--port", "65536"], "beamstream dashboard", "argument --port: expected a port number (0-65535"),
    (["analyse", "x.cbf", "--nproc", "0"], "beamstream analyse", "argument --nproc: must be at least 1, got 0"),
    (["replay", "--topic", "images", "--from-offset", "-1"], "beamstream replay",
     "argument --from-offset: must be 0 or more, got -1"),
    (["replay", "--topic", "images", "--from-time", "noon"], "beamstream replay",
     "argument --from-time: expected an ISO 8601 time"),
    (["replay", "--topic", "images", "--from-offset", "0", "--dcid", "0"], "beamstream replay",
     "argument --dcid: a dcid is positive"),
    (["dlq", "list", "--since", "last week"], "beamstream dlq list", "argument --since: expected an ISO 8601 time"),
    (["dlq", "purge", "--before", "2026-02-30"], "beamstream dlq purge", "argument --before: expected an ISO 8601"),
    (["cluster", "logs", "--lines", "0"], "beamstream cluster logs", "argument -n/--lines: must be at least 1"),
]


@pytest.mark.parametrize(("argv", "prog", "message"), COMMAND_LINES)
def test_a_bad_value_on_a_real_command_line_is_one_line(capsys, argv, prog, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{prog}: error: {message}")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


# -- the common service options ---------------------------------------------------------------

SERVICES = {"worker": [], "monitor": [], "archiver": [], "ispyb-sink": [], "feedback": ["--udp", "gda:9877"],
            "bluesky-bridge": ["--topic", "i03.bluesky.runengine.documents"]}


@pytest.mark.parametrize("command", sorted(SERVICES))
def test_every_service_has_the_same_log_level_and_metrics_port_options(command):
    parser = build_parser()
    args = parser.parse_args([command, *SERVICES[command]])
    # The monitor prints its events on stdout; its log stays quiet unless asked.
    assert args.log_level == ("warning" if command == "monitor" else "info")
    assert args.metrics_port is None
    args = parser.parse_args([command, *SERVICES[command], "--log-level", "debug", "--metrics-port", "9100"])
    assert (args.log_level, args.metrics_port) == ("debug", 9100)


def test_a_bad_metrics_port_in_the_environment_is_refused_before_logging_is_touched(monkeypatch):
    monkeypatch.setenv("BEAMSTREAM_METRICS_PORT", "nine")
    handlers = list(logging.getLogger().handlers)
    args = build_parser().parse_args(["archiver"])
    with pytest.raises(BeamstreamError, match="BEAMSTREAM_METRICS_PORT: expected a port number, got 'nine'"):
        start_service(args, "archiver", Settings())
    assert logging.getLogger().handlers == handlers


# -- run_stoppable: one way to run until SIGINT/SIGTERM ---------------------------------------


def test_work_that_finishes_on_its_own_returns_its_value_and_no_signal():
    assert run_stoppable(lambda stop: ("done", stop.is_set())) == (("done", False), None)


def test_the_first_signal_sets_the_stop_event_and_is_reported():
    def work(stop: threading.Event) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        return "stopped cleanly" if stop.wait(10) else "never told"

    assert run_stoppable(work) == ("stopped cleanly", signal.SIGTERM)


def test_a_service_s_own_stop_event_is_the_one_set():
    own = threading.Event()

    def work(stop: threading.Event) -> bool:
        os.kill(os.getpid(), signal.SIGINT)
        return own.wait(10) and stop is own

    assert run_stoppable(work, stop=own) == (True, signal.SIGINT)


def test_the_same_signal_twice_interrupts_and_the_handlers_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    release = threading.Event()

    def work(stop: threading.Event) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        stop.wait(10)
        os.kill(os.getpid(), signal.SIGINT)
        release.wait(10)  # a shutdown that takes too long

    try:
        with pytest.raises(KeyboardInterrupt):
            run_stoppable(work)
    finally:
        release.set()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_sigint_then_sigterm_still_stops_cleanly():
    # A worker started by `beamstream monitor` gets the terminal's Ctrl-C and then its parent's SIGTERM.
    def work(stop: threading.Event) -> str:
        os.kill(os.getpid(), signal.SIGINT)
        stop.wait(10)
        os.kill(os.getpid(), signal.SIGTERM)
        return "finished its transaction"

    assert run_stoppable(work) == ("finished its transaction", signal.SIGINT)


def test_the_work_s_exception_is_raised_in_the_caller():
    def work(stop: threading.Event) -> None:
        raise BeamstreamError("the cluster is down")

    with pytest.raises(BeamstreamError, match="the cluster is down"):
        run_stoppable(work)


# -- the launchers' pid files -----------------------------------------------------------------

MARKER = b"beamstream-pid-file-test"


@pytest.fixture
def sleeper():
    """A real process whose command line carries MARKER (and kafka.Kafka, apicurio-registry-app)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", MARKER.decode(),
                                "kafka.Kafka", "apicurio-registry-app"])
    try:
        yield process
    finally:
        process.kill()
        process.wait(10)


@pytest.fixture
def other_program():
    """A real process that is not ours to manage: its command line has no launcher's marker."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield process
    finally:
        process.kill()
        process.wait(10)


def _wait_until_execed(process: subprocess.Popen) -> None:
    """Until /proc shows the command line (right after Popen it may still be empty)."""
    for _ in range(200):
        if Path(f"/proc/{process.pid}/cmdline").read_bytes():
            return
        time.sleep(0.01)


def test_a_pid_file_naming_our_running_process_gives_its_pid_and_stop_ends_it(tmp_path, sleeper):
    _wait_until_execed(sleeper)
    record = PidFile(tmp_path / "x.pid", MARKER)
    record.record(sleeper.pid)
    assert record.running_pid() == sleeper.pid
    assert record.stop(timeout_s=10) is True
    assert sleeper.poll() is not None and not record.path.exists()
    assert record.running_pid() is None and record.stop(timeout_s=10) is False


@pytest.mark.parametrize("content", ["", "garbage", "0", "-1", "99999999"])
def test_a_missing_garbled_or_impossible_pid_is_not_running(tmp_path, content):
    record = PidFile(tmp_path / "x.pid", MARKER)
    assert record.running_pid() is None  # no file at all
    record.path.write_text(content)
    assert record.running_pid() is None


def test_a_reused_pid_of_another_program_is_stale(tmp_path, other_program):
    _wait_until_execed(other_program)
    record = PidFile(tmp_path / "x.pid", MARKER)
    record.record(other_program.pid)
    assert record.running_pid() is None
    assert record.stop(timeout_s=1) is False and other_program.poll() is None  # left alone


def test_a_pid_that_exited_is_stale(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass", MARKER.decode()])
    process.wait(30)
    record = PidFile(tmp_path / "x.pid", MARKER)
    record.record(process.pid)
    assert record.running_pid() is None


def _seen_by_another_user(pid_file: Path) -> list:
    """[os.kill(pid, 0) refused?, PidFile.running_pid()] as user nobody sees them, from a forked child."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and never returns
        try:
            os.close(read)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            pid = int(pid_file.read_text())  # the file is readable: a None below is the pid rule's
            try:
                os.kill(pid, 0)
                refused = False
            except PermissionError:
                refused = True
            os.write(write, json.dumps([refused, PidFile(pid_file, MARKER).running_pid()]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    os.waitpid(child, 0)
    return json.loads(text)


def test_a_pid_file_naming_another_user_s_process_is_stale(sleeper):
    """The one PermissionError rule: a process we may not signal is not the one we started."""
    _wait_until_execed(sleeper)
    if os.geteuid() == 0:
        # As root every process may be signalled: look from a child that became user nobody at
        # our (root's) process, whose command line does carry the marker.
        folder = Path(tempfile.mkdtemp())
        try:
            folder.chmod(0o755)
            (folder / "x.pid").write_text(str(sleeper.pid))
            (folder / "x.pid").chmod(0o644)
            assert _seen_by_another_user(folder / "x.pid") == [True, None]
        finally:
            (folder / "x.pid").unlink()
            folder.rmdir()
    else:
        try:
            os.kill(1, 0)
            pytest.skip("pid 1 is ours here: no other user's process to name")
        except PermissionError:
            pass
        with tempfile.TemporaryDirectory() as folder:
            record = PidFile(Path(folder) / "x.pid", b"")  # any command line would match
            record.record(1)
            assert record.running_pid() is None


def test_both_launchers_use_the_rule(tmp_path, sleeper, other_program):
    _wait_until_execed(sleeper)
    _wait_until_execed(other_program)
    settings = Settings(home=tmp_path)
    for launcher in (LocalCluster(settings), LocalRegistry(settings)):
        launcher.pid_file.parent.mkdir(parents=True, exist_ok=True)
        launcher.pid_file.write_text(str(other_program.pid))
        assert launcher.pid() is None and launcher.status().running is False
        launcher.pid_file.write_text(str(sleeper.pid))
        assert launcher.pid() == sleeper.pid and launcher.status().pid == sleeper.pid
    assert LocalRegistry(settings).down() is True  # the registry's stop ends the process
    sleeper.wait(10)
    assert LocalCluster(settings).down() is False and not LocalCluster(settings).pid_file.exists()
    assert other_program.poll() is None


def test_a_taken_port_is_named_with_the_setting_to_change():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {port} on 127.0.0.1 is taken by another process; "
                           "choose another with BEAMSTREAM_LOCAL_KAFKA_PORT"):
            require_free_ports((port,), "BEAMSTREAM_LOCAL_KAFKA_PORT", ClusterError)
    require_free_ports((port,), "BEAMSTREAM_LOCAL_KAFKA_PORT", ClusterError)  # free again
