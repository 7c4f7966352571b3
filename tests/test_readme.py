"""The README's example runs and does what it says (fastseq equals Keras predict)."""
import pathlib
import re

import numpy as np

from fastseq import config

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_matches_keras():
    text = README.read_text(encoding="utf-8")
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope = {}
    exec(compile(example, str(README), "exec"), scope)
    diff = np.abs(scope["probs"] - scope["model"].predict(scope["ids"], verbose=0)).max()
    assert diff <= config.KERAS_PARITY_ATOL


def test_readme_opens_with_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks[0].strip() == 'pip install ".[bench]" && fastseq bench'
    assert blocks[1].strip() == 'pip install -e ".[test]" && python -m pytest -q'
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -q -e ".[test]"' in ci and "\npython -m pytest -q\n" in ci
