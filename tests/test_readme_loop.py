"""The README's custom training loop runs exactly as printed."""

import contextlib
import io
import math
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_custom_loop_runs_verbatim():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- custom-loop -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert 15 <= len(code.strip().splitlines()) <= 25
    namespace: dict = {}
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md:custom-loop", "exec"), namespace)
    finally:
        os.chdir(cwd)
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 10", "step 20", "step 30"]
    assert int(namespace["state"].step) == 30
    assert all(math.isfinite(float(re.search(r"loss ([\d.]+)", line).group(1))) for line in lines)
