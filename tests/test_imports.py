"""Every module of the package imports on its own, first thing in a fresh interpreter: a user's
`from spatial_mllm.diagnostics.probe import probe_tower` must not depend on another module having been imported
before it (an import cycle only shows that way)."""

from __future__ import annotations

import subprocess
import sys

# One interpreter (torch and transformers load once); before each module every spatial_mllm module is forgotten.
CHECK = """
import importlib, pkgutil, sys
import spatial_mllm
names = [info.name for info in pkgutil.walk_packages(spatial_mllm.__path__, "spatial_mllm.")]
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "spatial_mllm" or m.startswith("spatial_mllm.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as err:
        failed.append(f"{name}: {err}")
print(len(names))
print("\\n".join(failed))
"""


def test_every_module_imports_first():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, *failed = done.stdout.strip().split("\n")
    assert int(count) > 100  # the whole package was walked
    assert [line for line in failed if line] == []
