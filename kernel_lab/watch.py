"""Has a candidate written into the example directory? (detection, not prevention)

The children run in temp working directories and kernel_lab.audit refuses writes from a program's
own code; what is left (C code, a write through a path the audit does not see) is detected here by
fingerprinting what the evaluation runs before and after a stage. Docs, tests, examples, outputs and
environments are left out, so that editing them during a run is not mistaken for a candidate's write.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHED_SUFFIXES = {".py", ".pth", ".yaml", ".yml", ".toml", ".ini", ".cfg"}
UNWATCHED_DIRS = {"__pycache__"}  # inside kernel_lab: bytecode caches may appear at any time


def fingerprint(root=ROOT):
    """{relative path: (size, mtime)} of the top-level code and config files (evaluator.py,
    config.yaml, initial_program.py, a planted sitecustomize.py ...) and the kernel_lab package."""
    found = {}
    top_files = [(root, [], [p.name for p in Path(root).iterdir()
                             if p.is_file() and p.suffix in WATCHED_SUFFIXES])]
    for directory, subdirs, files in top_files + list(os.walk(Path(root) / "kernel_lab")):
        subdirs[:] = [d for d in subdirs if d not in UNWATCHED_DIRS]
        for name in files:
            path = Path(directory, name)
            try:
                info = path.stat()
            except OSError:
                continue
            found[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return found


def changes(before, after):
    """What changed between two fingerprints, e.g. ['kernel_lab/x.py (new)']."""
    changed = [f"{p} (new)" for p in after.keys() - before.keys()]
    changed += [f"{p} (deleted)" for p in before.keys() - after.keys()]
    changed += [f"{p} (modified)" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(changed)


def error_since(before, root=ROOT):
    """The error when the directory changed since the fingerprint `before` (None: unchanged or off)."""
    if before is None:
        return None
    changed = changes(before, fingerprint(root))
    if not changed:
        return None
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return f"the program wrote into the evaluator's directory {root}: {shown}"
