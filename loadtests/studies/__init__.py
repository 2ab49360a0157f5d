"""One-off studies: each measures one question once (what a handler, a decode or logging
costs, memory per process, reliability under faults and floods, batch throughput) and prints
its figures; the commands a user runs (loadtest, bench, tune) live one folder up."""
