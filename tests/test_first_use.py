"""A new user's first minutes: the README's CPU snippet runs as pasted, and setting TRITON_INTERPRET
too late gives an error that says how to fix it."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env():
    """What a fresh shell has: no interpreter or strict switch, the checkout importable (as after
    `pip install -e .`)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONPATH": ROOT}


def _run(code, tmp_path):
    return subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_readme_cpu_snippet_runs_as_pasted(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippets = [code for code in re.findall(r"```python\n(.*?)```", readme, re.S)
                if 'os.environ["TRITON_INTERPRET"] = "1"' in code]
    assert len(snippets) == 1, "the README has one CPU snippet"
    proc = _run(snippets[0], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "variant='tile-persistent'" in proc.stdout  # the float32 kernel ran, not torch's fallback
    assert "bfloat16, H=128 runs a kernel: True" in proc.stdout
    difference = float(re.search(r"max difference from torch.nn: (\S+)", proc.stdout).group(1))
    assert difference < 1e-5


def test_interpreter_switched_on_after_import_raises_a_clear_error(tmp_path):
    proc = _run("import os, torch, rnn_triton\n"
                "os.environ['TRITON_INTERPRET'] = '1'\n"
                "rnn_triton.LSTM(8, 32)(torch.randn(5, 2, 8))\n", tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: rnn_triton: TRITON_INTERPRET=1 was set after triton was imported")
    assert "before the first import of triton or rnn_triton" in last
