"""How a run stopped by a signal ends: after its state is saved, with a non-zero exit status.

Its own module, below both the entry points' runner (:mod:`causal_ie.runs`) and the code that
saves the state (:mod:`causal_ie.lightning.resume`), so the runner need not import Lightning's
evaluation package to recognise a stop.
"""

from __future__ import annotations

import signal
from pathlib import Path


class EvaluationStopped(Exception):
    """A signal stopped the evaluation after its state was saved; ``exit_code`` is 128 + the
    signal's number, as a shell reports a process ended by it. ``batches``: the batches this
    process had done (of the test loop, or of the adaptive attack when ``part`` says so)."""

    def __init__(self, signum: int, directory: Path, batches: int, part: str = "test"):
        self.signum, self.directory, self.batches = int(signum), Path(directory), int(batches)
        self.exit_code = 128 + self.signum
        super().__init__(
            f"stopped by {signal.Signals(self.signum).name} after {batches} {part} batch(es) of this process; "
            f"the state is saved in {directory}: run the same command with the same hydra.run.dir "
            f"(or resume={directory.parent}) to continue"
        )
