"""The machine a benchmark ran on, printed with every figure (BENCHMARKS.md quotes it)."""

import os
import platform


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() where that is missing)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def describe_cpu() -> str:
    """'<CPU model>, <n> usable cores (<m> online), load <1-min average>'."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return (f'{cpu_name()}, {usable} usable cores ({os.cpu_count()} online), '
            f'load {os.getloadavg()[0]:.2f}')
