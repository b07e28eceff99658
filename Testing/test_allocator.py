"""The allocator setting (allocator.py) is in force wherever SACDiff runs the network, read back from its effect:
page faults of re-allocating freed memory (``resource.getrusage``), each case in a fresh child process."""

from __future__ import annotations

import os
import subprocess
import sys
import pytest

from conftest import ROOT

from SACDiffLib import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None,
                                reason="the setting applies to glibc (Linux) only; elsewhere it is a no-op")

PAGES_64MB = (64 << 20) // 4096  # what a fresh mmap of the probe's buffer faults in


def _child(code: str, **env) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != allocator.ENV_SWITCH}
    full_env.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=full_env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _probe_after(entry: str, **env) -> tuple[int, bool]:
    """Run ``entry`` (statements) in a child, then, at exit, the refault probe; → (faults, is_active)."""
    code = ("import atexit, sys\nfrom SACDiffLib import allocator\n"
            "atexit.register(lambda: print('PROBE', allocator.refault_probe(), allocator.is_active()))\n" + entry)
    line = [ln for ln in _child(code, **env).splitlines() if ln.startswith("PROBE")][-1].split()
    return int(line[1]), line[2] == "True"


def test_without_the_setting_glibc_refaults_a_freed_large_block():
    faults, active = _probe_after("pass")
    assert not active and faults > 0.9 * PAGES_64MB


@pytest.mark.parametrize("argv", [["--help"], ["detect", "--help"], ["train", "--help"], ["benchmark", "--help"]])
def test_python_m_sacdifflib_keeps_freed_memory_for_every_command(argv):
    """``python -m SACDiffLib`` is what ``sacdiff`` and the Slicer module's child process run; every command goes
    through ``cli.main`` (here stopped by --help right after it set the allocator up). That the Slicer child runs
    ``python -m SACDiffLib`` is checked in test_slicer_logic."""
    faults, active = _probe_after(
        f"import runpy\nsys.argv = ['sacdiff', *{argv!r}]\nrunpy.run_module('SACDiffLib', run_name='__main__')")
    assert active and faults < 0.02 * PAGES_64MB


def test_a_network_forward_no_longer_faults_its_activations():
    code = """
import resource, torch
from SACDiffLib import allocator
if {on}: allocator.keep_freed_memory()
torch.set_num_threads(1)
conv = torch.nn.Conv2d(8, 32, 3, padding=1)
x = torch.rand(8, 8, 256, 256)  # output 64 MiB, above glibc's largest mmap threshold
with torch.inference_mode():
    conv(x)
    conv(x)
    print(allocator.minor_faults(lambda: conv(x)))
"""
    off = int(_child(code.format(on=False)).split()[-1])
    on = int(_child(code.format(on=True)).split()[-1])
    assert off > 0.9 * PAGES_64MB and on < 0.05 * off


def test_the_escape_hatch_turns_it_off():
    faults, active = _probe_after(
        "import runpy\nsys.argv = ['sacdiff', '--help']\nrunpy.run_module('SACDiffLib', run_name='__main__')",
        SACDIFF_KEEP_FREED_MEMORY="0")
    assert not active and faults > 0.9 * PAGES_64MB
