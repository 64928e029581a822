"""What the Python peers report about their own process: CPU seconds and peak resident memory."""

import resource


def cpu_seconds():
    """User plus system CPU seconds of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb():
    """VmHWM of this process, MB (ru_maxrss would include the parent's, from before exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0)
    return None
