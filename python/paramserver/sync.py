"""A job's consistency model: asynchronous, bulk-synchronous or bounded-staleness training.

Chosen once per job (``paramserver scheduler --sync`` / ``paramserver launch --sync``) and told to
every server and worker when it registers:

- ``async`` (the default): every push is applied the moment it arrives; reads never wait.
- ``bsp``: in each step the servers combine one contribution from every worker of the job (the
  mean of the dense gradients, or their sum; embedding rows: the sum over the workers that pushed
  the row divided by the number of workers) and apply one optimizer step.
- ``ssp:S``: pushes are applied as they arrive, and a worker at clock ``c`` (``c`` pushes done)
  reads only once every worker has reached clock ``c - S`` (Ho et al., NIPS 2013). ``ssp:0``
  reads like BSP; ``async`` is ``ssp:∞``.

What happens when a worker of a synchronous job dies is the job's ``on_worker_failure``: ``fail``
(the step fails, with an error naming the worker) or ``shrink`` (the others go on without it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Consistency", "FAILURE_POLICIES"]

#: What a synchronous job does when one of its workers dies.
FAILURE_POLICIES = ("fail", "shrink")


@dataclass(frozen=True)
class Consistency:
    """A job's consistency model.

    Attributes:
        mode: ``"async"``, ``"bsp"`` or ``"ssp"``.
        staleness: the SSP bound ``S`` (clocks a read may lag behind the reader); 0 for BSP and
            unused for async.
    """

    mode: str = "async"
    staleness: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("async", "bsp", "ssp"):
            raise ValueError(f"consistency mode must be async, bsp or ssp:S, got {self.mode!r}")
        if self.staleness < 0 or (self.mode != "ssp" and self.staleness):
            raise ValueError(f"staleness {self.staleness} is only for ssp, and must be >= 0")

    @classmethod
    def parse(cls, text: str) -> Consistency:
        """``"async"``, ``"bsp"`` or ``"ssp:S"`` (S a non-negative int); ValueError otherwise."""
        raw = str(text).strip().lower()
        if raw in ("async", "bsp", ""):
            return cls(raw or "async")
        if raw.startswith("ssp:"):
            bound = raw[4:]
            if bound.isdigit():
                return cls("ssp", int(bound))
        raise ValueError(f"--sync must be async, bsp or ssp:S with S a non-negative integer "
                         f"(e.g. ssp:2), got {text!r}")

    @property
    def synchronous(self) -> bool:
        """True for bsp and ssp: workers count steps, and the servers track every worker's."""
        return self.mode != "async"

    def __str__(self) -> str:
        return f"ssp:{self.staleness}" if self.mode == "ssp" else self.mode
