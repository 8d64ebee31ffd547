"""The benchmark's table: rows of figures with their targets, which targets were met, and the facts about
the machine printed in its header (CPU, memory, file systems, how busy the machine was)."""

from __future__ import annotations

import os
import platform
import resource
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Target:
    name: str
    figure: str
    met: bool


@dataclass
class Report:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # measure, figure, target, verdict
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.rows.append((title, "", "", ""))

    def row(
        self,
        measure: str,
        figure: str,
        target: str = "",
        met: bool | None = None,
        target_name: str = "",
        label: str = "",
    ) -> None:
        """A line of the table; with `met`, also a target in the summary (`label`: which variant)."""
        verdict = "" if met is None else ("met" if met else "NOT met")
        self.rows.append(("  " + measure, figure, target, verdict))
        if met is not None:
            self.targets.append(Target(target_name or target, f"{label} {figure}".strip(), met))

    def summary(self, met: bool) -> str:
        grouped: dict[str, list[str]] = {}
        for target in self.targets:
            if target.met is met:
                grouped.setdefault(target.name, []).append(target.figure)
        return "; ".join(f"{name} ({', '.join(figures)})" for name, figures in grouped.items()) or "none"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


def mount_of(path: Path) -> str:
    """'ext4 /dev/vda' for the file system holding `path`."""
    best, found = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        device, point, kind = line.split()[:3]
        if str(path).startswith(point) and len(point) > len(best):
            best, found = point, f"{kind} {device}"
    return found


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = next(
        (
            int(line.split()[1]) // 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return (
        f"{os.cpu_count()} CPUs ({model}), {memory:,} MiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def busy_cpu_seconds() -> float:
    """CPU time all processes on the machine used so far (the busy jiffies of /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process and of its finished children (every server and worker it started)."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def render(report: Report, header: list[str]) -> str:
    width = [max(len(r[i]) for r in report.rows if r[1] or i == 0) for i in range(4)]
    width[0] = min(width[0], 64)
    lines = [*header, ""]
    head = ("measure", "figure", "target", "")
    lines.append(f"{head[0]:<{width[0]}}  {head[1]:<{width[1]}}  {head[2]:<{width[2]}}  {head[3]}".rstrip())
    for measure, figure, target, verdict in report.rows:
        if not figure:
            lines += ["", measure]
            continue
        lines.append(f"{measure:<{width[0]}}  {figure:<{width[1]}}  {target:<{width[2]}}  {verdict}".rstrip())
    lines += ["", "Targets met:     " + report.summary(True), "Targets NOT met: " + report.summary(False)]
    if report.notes:
        lines += ["", *report.notes]
    return "\n".join(lines)
