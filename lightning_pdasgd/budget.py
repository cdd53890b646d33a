"""The core budget: the engine's threads together use the machine's cores once, not once each.

torch gives every thread that runs an operator its own intra-op team (OpenMP on CPU), sized by
``torch.set_num_threads`` as seen by that thread. A plain loop runs one thread with a team as large as the
machine; PD-ASGD runs a forward thread and several backward threads at once, and if each kept the full team the
cores would be oversubscribed (measured on 2 cores: 1 forward + 2 backward threads with 2 intra-op threads each
ran at 0.6x plain; with 1 each at 1.34x a plain loop on 1 thread). Each engine thread therefore gets an equal
share of the cores among the threads that can compute at the same moment.
"""

from __future__ import annotations


def concurrent_threads(backward_threads: int, max_in_flight: int) -> int:
    """How many engine threads can compute at once: the forward and the backwards that have work.

    With ``max_in_flight=1`` the next forward waits for the previous backward, so only one thread computes.
    """
    if max_in_flight <= 1:
        return 1
    return 1 + min(backward_threads, max_in_flight)


def intra_op_threads_per_thread(cores: int, backward_threads: int, max_in_flight: int) -> int:
    """Intra-op threads for each engine thread: the cores split over the threads that compute together."""
    return max(1, cores // concurrent_threads(backward_threads, max_in_flight))
