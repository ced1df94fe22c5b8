"""The machine's memory at the start of the run, so a CI log shows when tests ran short of it."""
import glob
import os

import psutil


def pytest_sessionstart(session):
    vm = psutil.virtual_memory()
    line = f"memory: {vm.available / 2**30:.1f} of {vm.total / 2**30:.1f} GiB available"
    if os.path.isdir("/dev/shm"):
        shm = psutil.disk_usage("/dev/shm")
        stale = glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")
        line += f"; /dev/shm {shm.used / 2**30:.1f} GiB used, {len(stale)} DeepSpeed all-reduce buffers"
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(line)
