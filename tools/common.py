"""What the tools share: the repository's root on the import path (the project's modules import
each other by their plain names, as `python3 run.py` does from the root), and the description of
the machine saved with every benchmark's JSON.

Each tool starts with the same two lines, which work from any folder and under pytest:

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.common import ROOT, machine_info
"""
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def machine_info(**extra):
    """The CPU's model name, cores, versions, date and load average (and the GPU where there is
    one), with a warning when the machine was busy; `extra` adds entries (e.g. a library's
    version)."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average_at_start": load, **extra}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if load and load[0] >= 0.5 * info["cores"]:
        info["warning"] = (f"the machine was busy (load average {load[0]:.1f} on {info['cores']} "
                           "cores): the speeds are low, and only comparable within this run")
    return info
