"""Rank 0's side effects while training: the header, progress lines, metrics.jsonl, the summary.

Every method is a no-op on other ranks, so the training loop calls them unconditionally.
"""

from __future__ import annotations

import json
import os
import sys


class Progress:
    def __init__(self, comm, run_dir, quiet=False, verbose=False, resume=False):
        self.active = comm.rank == 0
        self.quiet, self.verbose = quiet, verbose
        self.metrics = None
        if self.active:
            os.makedirs(run_dir, exist_ok=True)
            # Appending keeps the history of a resumed or requeued run in one file.
            self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a" if resume else "w")

    def say(self, text, always=False):
        if self.active and (always or not self.quiet):
            print(text, flush=True)

    def warn(self, text):
        if self.active:
            print(f"dpbp: warning: {text}", file=sys.stderr, flush=True)

    def header(self, lines):
        for line in lines:
            self.say(line)

    def record(self, rec):
        """One metrics.jsonl line, and a grep-able progress line."""
        if not self.active:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if rec.get("split") == "val":
            acc = f" accuracy {rec['accuracy']:.4f}" if "accuracy" in rec else ""
            self.say(f"eval step {rec['step']} epoch {rec['epoch']} val_loss {rec['loss']:.6g}{acc}")
        else:
            acc = f" accuracy {rec['accuracy']:.4f}" if "accuracy" in rec else ""
            share = rec["comm_s"] / rec["step_s"] if rec.get("step_s") else 0.0
            self.say(f"step {rec['step']} epoch {rec['epoch']} loss {rec['loss']:.6g}{acc} "
                     f"samples/s {rec['samples_per_s']:.0f} allreduce {100 * share:.1f}%")

    def close(self):
        if self.metrics is not None:
            self.metrics.close()
