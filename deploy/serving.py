"""A served model's workers and batching: the defaults, each with its measurement, and what
a declaration or a flag sets over them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from kiln import declaration

# What an archive built before Kiln moved workers and batching to config.properties may still
# carry: TorchServe lets these win over kiln serve's settings.
SHADOWING_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")


# The requests a model's workers batch together, shared among them, and the least one
# worker batches. Measured with kiln tune lenet on 2 cores (wrk, 16 clients, 1 ms delay):
# one worker reached 3140 req/s with batch 16 and 2284 with 8; two workers 3189 with 8 and
# 2912 with 16 (the clients spread over the workers, so each worker's batch is smaller).
# A batch waits for no one beyond the delay, so a bigger limit costs nothing when idle.
BATCH_PER_MODEL = 16
MIN_BATCH = 8
# TorchServe holds a lone client's request for the whole delay, waiting for a second one:
# 1-client p50 = unbatched p50 + delay (measured so before Kiln's greedy batching, which
# waits only once a second request is queued: docs/batching.md). Keeping it within 1.5x the
# unbatched p50 caps the delay at half of that. lenet's unbatched 1-client p50 on 2 cores,
# wrk straight to TorchServe (kiln tune lenet, two runs): 1.5 to 1.7 ms, so 0.8 ms; 1 ms is
# the least a batch can have (TorchServe reads 0 as its own 100 ms) and measured 1.4x to
# 1.6x, where 2 ms measured 2.1x to 2.3x. Behind the front proxy the unbatched p50 is
# higher, the ratio lower.
MAX_BATCH_DELAY_MS = 1


@dataclass(frozen=True)
class ModelServing:
    """A served model's workers and batching: what a declaration's [serving] or a flag set,
    over `derived`'s defaults for the machine and the models served beside it.

    They go into config.properties' `models` setting, never into the archive: TorchServe
    lets an archive's model-config.yaml win over config.properties for these keys. The
    field names are a declaration's [serving] keys.
    """

    workers: int = 1
    batch_size: int = BATCH_PER_MODEL
    max_batch_delay_ms: int = MAX_BATCH_DELAY_MS

    def __post_init__(self):
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name == "max_batch_delay_ms" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{f.name} must be a whole number >= {least}, got {value!r}")
        if self.max_batch_delay_ms == 0 and self.batch_size > 1:
            # config.properties cannot say 0: TorchServe reads a value <= 0 there as unset.
            raise ValueError("max_batch_delay_ms 0 with batch_size > 1 would be read by "
                             "TorchServe as its own default (100 ms): use 1 or more")

    @classmethod
    def derived(cls, cores: int, models: int) -> ModelServing:
        """Defaults that need no tuning, for `models` served together on `cores` usable cores
        (kiln.handlers.cores: affinity and cgroup quota, not the host's count).

        - workers: cores // models, at least 1. A worker is one process running one batch at
          a time on about one core; all workers together about as many as the cores keeps
          every core busy when traffic is spread and none oversubscribed when it all comes at
          once, and memory (one process per worker) grows with the cores, not past them.
        - intra-op threads (the handler's "auto", from KILN_SERVED_WORKERS): cores // all
          workers, at least 1, so that workers running at once never fight for cores.
        - batch size BATCH_PER_MODEL // workers, at least MIN_BATCH (16 for one worker, 8
          for more): a model's clients spread over its workers, so each worker's batch fills
          less as they grow; a lone request never waits for a batch to fill, only for the
          delay, so a batch limit costs nothing when idle.
        - max batch delay MAX_BATCH_DELAY_MS: TorchServe holds a lone client's request for the
          whole delay, so it is capped to keep one client's p50 within 1.5x the unbatched
          p50 (see the constant for the measurement); Kiln's greedy batching waits it only
          once a second request is queued.
        """
        if cores < 1 or models < 1:
            raise ValueError(f"cores and models must be >= 1, got {cores} and {models}")
        workers = max(1, cores // models)
        return cls(workers=workers, batch_size=max(MIN_BATCH, BATCH_PER_MODEL // workers),
                   max_batch_delay_ms=MAX_BATCH_DELAY_MS)

    @classmethod
    def resolve(cls, declared: Mapping[str, int], defaults: ModelServing | None = None,
                **given: int | None) -> ModelServing:
        """`defaults` (None: the class's), then `declared` (a declaration's [serving]), then
        what was given (None: not given). Keys of `declared` that are not serve-time
        settings are ignored."""
        names = {f.name for f in fields(cls)}
        chosen = vars(defaults).copy() if defaults is not None else {}
        chosen.update({k: v for k, v in declared.items() if k in names})
        chosen.update({k: v for k, v in given.items() if v is not None})
        return cls(**chosen)

    def torchserve(self) -> dict[str, int]:
        """The settings as TorchServe names them in config.properties' `models`."""
        return {"minWorkers": self.workers, "maxWorkers": self.workers,
                "batchSize": self.batch_size, "maxBatchDelay": self.max_batch_delay_ms}


def declared_serving(name: str, models_dirs: list[Path] | None = None,
                     defaults: ModelServing | None = None, **given: int | None) -> ModelServing:
    """What `name` is served with: `defaults` (ModelServing.derived's, for the machine and
    the models served) < its declaration's [serving] < `given`."""
    return ModelServing.resolve(declaration.get(name, models_dirs).serving, defaults, **given)
