"""``freed_memory_kept``: inside it freed buffers serve the next allocations without page faults; leaving
it gives that memory back to the kernel."""

from __future__ import annotations

import os
import resource

import pytest
import torch

from canary_qwen.backends.cpu_heap import _glibc, freed_memory_kept

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc")

FLOATS = 16 * 2**20  # 64 MiB buffers: above glibc's largest mmap threshold (32 MiB), so mapped by default


def page_faults_of_some_work() -> int:
    """Page faults of a few rounds of element-wise ops on fresh 64 MiB tensors (what a forward pass does)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        a = torch.ones(FLOATS)
        b = a * 2
        c = a + b
        del a, b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_freed_buffers_are_reused_inside_and_given_back_on_leaving():
    outside = page_faults_of_some_work()  # each buffer mapped and faulted in afresh: ~24 x 16384 pages
    with freed_memory_kept():
        page_faults_of_some_work()  # grows the heap to the work's peak
        inside = page_faults_of_some_work()
        with freed_memory_kept():  # nested holders (concurrent calls) keep the setting
            nested = page_faults_of_some_work()
        kept = resident_bytes()
    assert outside > 100_000, outside
    assert inside < outside / 10 and nested < outside / 10, (inside, nested, outside)
    assert kept - resident_bytes() > 2 * 4 * FLOATS  # the heap's free peak (three buffers) given back
