"""CPU accounting from /proc: one process (the server, pgbench), the PostgreSQL cluster
(the postmaster with its live and exited backends) and the whole machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    return text.rsplit(")", 1)[1].split()


def process_cpu(pid: int, children: bool = False) -> float:
    """utime + stime of ``pid`` (all its threads), plus its reaped children's with
    ``children``, in seconds; 0 when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is the state (field 3 of stat): utime is field 14 -> index 11.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def cluster_cpu(postmaster: int | None) -> float:
    """The postmaster and every backend: the live ones read directly, the exited ones
    through the postmaster's reaped-children times."""
    if postmaster is None:
        return 0.0
    total = process_cpu(postmaster, children=True)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


@dataclass(frozen=True)
class MachineCpu:
    busy: float  # steal included: time the hypervisor gave to other guests counts as busy
    total: float
    steal: float = 0.0


def parse_proc_stat(text: str) -> MachineCpu:
    """The first ("cpu") line of /proc/stat: user nice system idle iowait irq softirq steal
    [guest guest_nice], in clock ticks."""
    values = [int(v) for v in text.splitlines()[0].split()[1:]]
    values += [0] * (8 - len(values))  # kernels before 2.6.11 stop at softirq
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return MachineCpu(busy=(total - idle) / TICK, total=total / TICK, steal=values[7] / TICK)


def machine_cpu() -> MachineCpu:
    """Busy, total and stolen CPU seconds of the machine (all cores) since boot."""
    return parse_proc_stat(Path("/proc/stat").read_text())


def machine_info() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu_model": model,
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": os.uname().release,
    }
