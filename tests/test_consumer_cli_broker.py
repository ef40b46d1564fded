"""`depois-stream broker`: a local broker with the default topics, stopped cleanly by SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from kafka import KafkaConsumer


def test_broker_command_serves_default_topics_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "depois_stream", "broker", "--partitions", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("bootstrap: 127.0.0.1:"), line + proc.stderr.read()
        bootstrap = line.split()[1]
        consumer = KafkaConsumer(bootstrap_servers=bootstrap)
        try:
            assert {"depois.ingest", "depois.clean", "depois.quarantine", "depois.dlq",
                    "depois.audit"} <= consumer.topics()
            assert consumer.partitions_for_topic("depois.ingest") == {0, 1}
        finally:
            consumer.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "broker stopped" in out
    host, port = bootstrap.split(":")
    with socket.socket() as s:
        assert s.connect_ex((host, int(port))) != 0  # the broker process is gone
