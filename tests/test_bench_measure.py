"""The benchmark's own accounting: stolen CPU kept apart from other work, and the server's
batch sizes read from its /metrics (pure rules; `make bench` runs them for real), and the
server it starts found on the ports it bound."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench import compare_servers, measure, server_metrics, stack
from bench.run import Window, _summary

TICK = measure.TICK


def _proc_stat(user: int, idle: int, steal: int) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {user} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n"


def test_proc_stat_steal_is_busy_and_reported_apart() -> None:
    cpu = measure.parse_proc_stat(_proc_stat(user=300, idle=500, steal=200))
    assert cpu.busy == 500 / TICK
    assert cpu.total == 1000 / TICK
    assert cpu.steal == 200 / TICK


def test_proc_stat_without_a_steal_field() -> None:
    cpu = measure.parse_proc_stat("cpu  300 0 0 500 0 0 0\n")
    assert cpu.steal == 0
    assert cpu.busy == 300 / TICK


def _window(busy_ticks: int, steal_ticks: int, server: float) -> Window:
    return Window(
        server=server,
        cluster=0.0,
        machine=measure.MachineCpu(
            busy=busy_ticks / TICK, total=10_000 / TICK, steal=steal_ticks / TICK
        ),
    )


def test_other_cores_leave_out_what_the_hypervisor_stole() -> None:
    before = _window(0, 0, server=0.0)
    # In 10 s: 12 s busy, of which 4 s stolen and 6 s the server's; 2 s of other work.
    after = _window(12 * TICK, 4 * TICK, server=6.0)
    row = _summary("consume", 16, 10.0, [1.0, 2.0], {}, before, after, generator_cpu=0.0)
    assert row["steal_cores"] == 0.4
    assert row["other_cores"] == 0.2
    assert row["calls_per_batch"] is None


def test_the_far_tail_is_reported_beside_the_p99() -> None:
    latencies = [1.0] * 998 + [30.0, 90.0]  # two slow calls in 1,000
    row = _summary("balance", 16, 1.0, latencies, {}, _window(0, 0, 0.0), _window(0, 0, 0.0), 0.0)
    assert row["p99_ms"] == 1.0
    assert row["p999_ms"] == 30.0
    assert row["max_ms"] == 90.0


def _exposition(charges: Sequence[int], balances: Sequence[int] = ()) -> str:
    registry = CollectorRegistry()
    for name, sizes in zip(server_metrics.BATCH_HISTOGRAMS, (charges, balances), strict=True):
        histogram = Histogram(name, "calls", buckets=(1, 2, 4, 8, 16, 32), registry=registry)
        for calls in sizes:
            histogram.observe(calls)
    other = Histogram("ledger_rpc_duration_seconds", "not a batch", registry=registry)
    other.observe(3.0)
    return generate_latest(registry).decode()


def test_calls_per_batch_over_a_window() -> None:
    before = server_metrics.parse_batches(_exposition([1, 1]))
    after = server_metrics.parse_batches(_exposition([1, 1, 8, 16, 30]))
    assert (before.calls, before.batches) == (2, 2)
    assert server_metrics.calls_per_batch(before, after) == 18.0


def test_balance_reads_count_as_batches_too() -> None:
    before = server_metrics.parse_batches(_exposition([], [1]))
    after = server_metrics.parse_batches(_exposition([], [1, 1, 10]))
    assert server_metrics.calls_per_batch(before, after) == 5.5


def test_no_batches_in_the_window_gives_no_figure() -> None:
    totals = server_metrics.parse_batches(_exposition([4]))
    assert server_metrics.calls_per_batch(totals, totals) is None
    assert server_metrics.calls_per_batch(None, totals) is None
    assert server_metrics.parse_batches("") == server_metrics.BatchTotals(0, 0)


def test_a_server_without_metrics_gives_no_figure_rather_than_stopping_the_run() -> None:
    with socket.socket() as sock:  # a port nothing listens on: bound, never listened
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"
        assert server_metrics.batches(url) is None
    assert server_metrics.batches(None) is None


def test_the_bench_server_is_found_on_the_ports_it_bound_not_an_earlier_runs(
    fresh_database_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bench appends every start to one log: an earlier run's ports must not be read.
    # A quieter log level in the caller's environment must not hide the lines it reads.
    monkeypatch.setenv("LEDGER_LOG_LEVEL", "WARNING")
    log_path = tmp_path / "server.log"
    log_path.write_text(
        '{"message": "metrics on http://127.0.0.1:1/metrics"}\n'
        '{"message": "ledger gRPC server listening on 127.0.0.1:0 (port 1), event loop x"}\n'
    )
    dbs = stack.Databases(
        server_url=fresh_database_url,
        database_url=fresh_database_url,
        redis_url=redis_url,
        embedded_pgdata=None,
    )
    with stack.server(dbs, log_path) as srv:
        assert srv.address != "127.0.0.1:1"
        with grpc.insecure_channel(srv.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert srv.metrics_url and ":1/" not in srv.metrics_url
        totals = server_metrics.batches(srv.metrics_url)
        assert totals is not None  # the server's own /metrics answered


@pytest.mark.parametrize("mode", ["aio", "sync"])
def test_the_servers_compared_are_found_on_the_port_they_bound(
    ledger_db_url: str, tmp_path: Path, mode: str
) -> None:
    # bench.compare_servers' own servers bind port 0 too, and an earlier start's line in
    # their log is not read.
    (tmp_path / f"{mode}-server.log").write_text("listening on 127.0.0.1:0 (port 1)\n")
    dbs = stack.Databases(
        server_url=ledger_db_url, database_url=ledger_db_url, redis_url="", embedded_pgdata=None
    )
    with compare_servers.experimental(dbs, mode, tmp_path) as (address, _pid):
        assert address != "127.0.0.1:1"
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_log_without_a_metrics_line_gives_no_metrics_url() -> None:
    ports = stack.ports_from_log("ledger gRPC server listening on [::]:0 (port 50123), x\n")
    assert ports == stack.Ports(grpc=50123, metrics_url="")
