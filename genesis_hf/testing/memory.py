"""Resident memory of this process, for the memory bounds that tests assert and benchmarks report (Linux /proc)."""

import os
import threading


def rss_mib() -> float:
    """This process's resident set size in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Samples the resident set every 5 ms while the `with` block runs: a peak inside a native call (the tokenizer's
    encoder) counts, which a reading before and after would miss. `growth_mib` is the peak above the start."""

    def __enter__(self) -> "PeakRss":
        self.before = self.peak = rss_mib()
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._sampler.join()
        self.peak = max(self.peak, rss_mib())

    @property
    def growth_mib(self) -> float:
        return self.peak - self.before
