"""Reliability, in one run and one table: `python -m kiln.loadtests.studies.reliability`.

Seven parts, against Kiln's default set served as `kiln serve` serves it (front proxy and
TorchServe on free loopback ports), started for the purpose, or the server `kiln serve` runs
from --run-dir; every request goes through server.url() with server.keys():

1. kill: wrk loads the first image model while one of its workers is SIGKILLed; failed
   requests by status, the time until a request sent after the kill is answered 200 again
   (a probe client beside wrk), the time until the management API lists a READY replacement,
   and what a client of the second image model, looping throughout, saw meanwhile.
2. slow: N connections that trickle their headers at one byte a second (slowloris), held on
   the REST and the Open Inference Protocol port while good clients call that port: p50, p99,
   throughput and failed requests with them held, beside the same without them.
3. amplification: the time of the costliest requests the handlers accept (the most images
   at the request pixel bound, one image at it, the most JSON pixel arrays, the most feature
   rows) beside a minimal request, and the time to refuse one just over each bound.
4. soak: --soak-seconds of steady mixed load (every served model, REST and OIP) while the
   RSS and PSS of the frontend and of each model's workers are sampled: start, end, max and
   the slope in MB per 100k requests.
5. thin: the time to answer or refuse the costliest images of any shape, and good requests of
   the first image model while clients send one in a loop (loadtests/studies/thin_images.py).
6. oip_flood: --clients clients for --load-seconds sending the first image model the largest
   binary OIP requests it takes and refuses (loadtests/studies/oip_flood.py): answers by status, the
   frontend's RSS before, at its peak and after, and workers replaced.
7. front_kill: wrk on the first image model for --load-seconds while the front proxy's nginx
   master is killed hard a third of the way in: until its orphaned workers are gone, until a
   new master, until a 200 again, and what the load lost (loadtests/studies/front_kill.py).

The load generator (wrk; in part 2 Python clients, which account for every request sent) shares
the cores with the server: its CPU is in the table.
No model is named here; they are picked from what the server serves by the kind of input.
"""
