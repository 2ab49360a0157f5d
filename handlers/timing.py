"""Server-Timing: how long a request waited for its batch and what each of the handler's
stages took for it, from the front proxy's receipt to its answer.

The stages, in milliseconds, tile the time from when nginx read the request to when its
answer was encoded, so their sum is at most what the client waited:

- queue: from nginx's receipt (RECEIVED_HEADER, its $msec) to the start of the batch the
  request rode in: the hop to TorchServe, TorchServe's queue and batch delay, and the handoff
  to the worker. $msec has whole milliseconds, truncated: the receipt is taken as the end of
  its millisecond, so that the queue is never overstated (it may read up to 1 ms short).
- preprocess: the batch's decoding, every request of it (a request waits for its neighbours).
- inference: the batch's one model call (0 when nothing in the batch could be scored).
- postprocess: the encoding of this request's own answer.

The trace context the handler was given (the proxy's span as parent) is said again as a
`traceparent` entry, as browsers' tracing agents read it.
"""

import math
import re
import time

# Set by the front proxy on every request it forwards (deploy/nginx/nginx.conf).
RECEIVED_HEADER = "Kiln-Received"
TRACEPARENT_HEADER = "traceparent"
SERVER_TIMING_HEADER = "Server-Timing"
# A bad request's reason (kiln.handlers.errors.REJECT_REASONS), for the access log.
REASON_HEADER = "Kiln-Reason"
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def queue_ms(received, batch_started):
    """Milliseconds from nginx's receipt (a header's text, seconds since the epoch) to
    `batch_started` (time.time()); None without a usable receipt."""
    try:
        at = float(received)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(at):
        return None
    return max(0.0, (batch_started - (at + 0.001)) * 1000)


def server_timing(queue, preprocess, inference, postprocess, traceparent=None):
    """The header's value; durations in ms (queue None: not said)."""
    stages = [("queue", queue), ("preprocess", preprocess), ("inference", inference),
              ("postprocess", postprocess)]
    parts = [f"{name};dur={value:.3f}" for name, value in stages if value is not None]
    if traceparent and TRACEPARENT.fullmatch(traceparent):
        parts.append(f'traceparent;desc="{traceparent}"')
    return ", ".join(parts)


now = time.perf_counter


class BatchClock:
    """One batch's times: its start, its model call, each request's encoding (perf_counter
    readings, placed on the wall clock by the batch's start)."""

    def __init__(self, batch_size=1):
        self.batch_size = batch_size
        self.wall = time.time()  # compared with nginx's clock (same host)
        self.started = now()
        self.decoded_at = self.started
        self.inference = (self.started, self.started)  # none: nothing scored
        self.encoding = {}  # request index: (start, end)

    def decoded(self):
        self.decoded_at = now()

    def scored(self, since):
        self.inference = (since, now())

    def encoded(self, idx, since):
        self.encoding[idx] = (since, now())

    def header(self, idx, received, traceparent):
        start, end = self.encoding.get(idx, (0.0, 0.0))
        return server_timing(queue_ms(received, self.wall),
                             (self.decoded_at - self.started) * 1000,
                             (self.inference[1] - self.inference[0]) * 1000,
                             (end - start) * 1000, traceparent)

    def stages(self, idx, received):
        """(name, start ns, end ns) on the wall clock of each stage of request `idx` (queue
        only with a receipt time)."""
        def ns(reading):
            return int((self.wall + reading - self.started) * 1e9)

        found = []
        queue = queue_ms(received, self.wall)
        if queue is not None:
            found.append(("queue", int((self.wall - queue / 1000) * 1e9), ns(self.started)))
        found.append(("preprocess", ns(self.started), ns(self.decoded_at)))
        found.append(("inference", ns(self.inference[0]), ns(self.inference[1])))
        if idx in self.encoding:
            found.append(("postprocess", *map(ns, self.encoding[idx])))
        return found
