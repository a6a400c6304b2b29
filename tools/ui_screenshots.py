"""Screenshots of what a user sees in ``mlflow ui`` after a sweep (the README's pictures).

    python tools/ui_screenshots.py                      # runs config.yaml into a temporary store first
    python tools/ui_screenshots.py --store /path/to/dir --experiment cartpole-smoke   # an existing store
    python tools/ui_screenshots.py --out docs/img

It starts ``mlflow ui`` on 127.0.0.1 with a free port, opens three pages in headless Chromium (the
experiment's runs, the newest sweep's parent run with its summary note, the sweep's comparison
figure) and writes ``mlflow_runs.png``, ``mlflow_sweep.png`` and ``mlflow_comparison.png``. The
pages are opened with ``?workflowType=machine_learning``: MLflow 3 otherwise shows its GenAI pages.

Needs a Chromium (Debian: ``apt-get install chromium-headless-shell``, or ``chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(browser: str, url: str, path: Path, height: int = 900) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1500,{height}", "--virtual-time-budget=20000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, help="directory holding mlflow.db (and mlruns/); default: run config.yaml first")
    p.add_argument("--experiment", default="cartpole-smoke", help="experiment to show (default: cartpole-smoke)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (default: docs/img)")
    args = p.parse_args(argv)
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print(f"error: no Chromium found (looked for {', '.join(BROWSERS)}); apt-get install chromium-headless-shell",
              file=sys.stderr)
        return 2
    store = args.store
    if store is None:
        store = Path(tempfile.mkdtemp(prefix="qmlbench-ui-"))
        subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(ROOT / "config.yaml")], cwd=store, check=True)
    uri = f"sqlite:///{store.resolve()}/mlflow.db"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"error: no experiment {args.experiment!r} in {uri}", file=sys.stderr)
        return 2
    sweeps = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        print(f"error: experiment {args.experiment!r} has no sweep", file=sys.stderr)
        return 2
    exp_id, parent = experiment.experiment_id, sweeps[0].info.run_id
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port)], cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        args.out.mkdir(parents=True, exist_ok=True)
        mode = "workflowType=machine_learning"
        screenshot(browser, f"{base}/#/experiments/{exp_id}/runs?{mode}", args.out / "mlflow_runs.png")
        screenshot(browser, f"{base}/#/experiments/{exp_id}/runs/{parent}?{mode}", args.out / "mlflow_sweep.png", 1100)
        screenshot(browser, f"{base}/#/experiments/{exp_id}/runs/{parent}/artifacts/comparison.png?{mode}",
                   args.out / "mlflow_comparison.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
