import os
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config_schema import load_config  # noqa: E402


def experiment(**fields):
    """One validated ExperimentConfig built from keyword fields (nested dicts allowed)."""
    fields.setdefault("name", "t")
    return load_config(raw={"experiments": [fields]}).experiments[0]

