"""The run directory: what lives where, and the guards that keep one run from overwriting
another's checkpoints.

output_dir/
  args.json            resolved config, secrets redacted
  log.txt              rank 0's log lines
  latest               name of the newest complete checkpoint (written last, atomically)
  checkpoints/<tag>/   one DeepSpeed checkpoint per trainable net + trainer_state.json + rng/
  samples/step-N/      grid.png and one PNG per validation prompt
  loss_logs/*.jsonl    one JSON object per log interval
"""
from __future__ import annotations

import json
import os
from pathlib import Path

IDENTITY_KEYS = (("model", "path"), ("objectives",))


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.loss_logs = self.root / "loss_logs"
        self.args = self.root / "args.json"
        self.log = self.root / "log.txt"
        self.latest = self.root / "latest"

    def make(self) -> None:
        for d in (self.root, self.checkpoints, self.samples, self.loss_logs):
            d.mkdir(parents=True, exist_ok=True)

    def latest_tag(self) -> str | None:
        if not self.latest.is_file():
            return None
        tag = self.latest.read_text().strip()
        if not (self.checkpoints / tag / "trainer_state.json").is_file():
            raise ValueError(f"{self.latest} names {tag}, which is not a complete checkpoint: "
                             f"fix the file to name a directory under {self.checkpoints}")
        return tag

    def tag_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    def write_latest(self, tag: str) -> None:
        tmp = self.latest.with_suffix(".tmp")
        tmp.write_text(tag + "\n")
        os.replace(tmp, self.latest)

    def check_can_start(self, config: dict, resume: bool) -> bool:
        """True if the run resumes. Raises if the directory holds a run we must not touch."""
        has_ckpt = self.latest.is_file()
        if has_ckpt and not resume:
            raise ValueError(f"{self.root} already holds checkpoints ({self.latest}): pass "
                             "--resume auto to continue that run, or choose a new --output-dir")
        if self.args.is_file():
            old = json.loads(self.args.read_text())
            for path in IDENTITY_KEYS:
                a, b = _dig(old, path), _dig(config, path)
                if a != b and has_ckpt:
                    raise ValueError(f"{self.args} is another run ({'.'.join(path)}={a!r}, this one "
                                     f"{b!r}): choose a new --output-dir")
        return has_ckpt and resume


def _dig(d: dict, path: tuple[str, ...]):
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d
