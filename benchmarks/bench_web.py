"""The web demo's time to first result per tab, measured in a real headless Chromium; screenshots.

Starts `univigu serve` (the real command, in a subprocess) on a free port, waits for the page,
then drives each tab as a person would and times it from the click to the result on the page:

* T2V: the video loaded and playing (and, for a unified model, its caption shown);
* V2T: a ShapesWorld example picked, then its caption and candidate table shown;
* joint: the first streamed step, and the final video playing with its caption.

Each tab runs twice: the first result (what a visitor waits for after the server is up) and a
second one (warm). With `--screenshots DIR` it saves one PNG per tab (t2v.png, v2t.png,
joint.png) after the first result: that is how docs/assets/web/ was made, once, by hand.

    python benchmarks/bench_web.py --model runs/demo/capability_refinement/model \\
        --screenshots docs/assets/web
    python benchmarks/bench_web.py --model src/univigu/assets/generator --out benchmarks/results/web_generator.json

Writes benchmarks/results/web_first_result.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import RESULTS_DIR, machine_info, write_json
from univigu.web.browser import DemoPage, start_chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"univigu serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return time.perf_counter() - start
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the page did not come up in {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: univigu serve's default)")
    parser.add_argument("--screenshots", default=None, metavar="DIR", help="save t2v.png, v2t.png, joint.png here")
    parser.add_argument("--out", default=str(RESULTS_DIR / "web_first_result.json"))
    parser.add_argument("--prompt", default="a large red circle moves to the left")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for any one result")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "univigu", "serve", "--port", str(port)]
    if args.model:
        command += ["--ckpt_dir", args.model]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results: dict = {"model": args.model or "univigu serve's default", "command": " ".join(command[1:])}
    driver = None
    try:
        results["server_ready_seconds"] = round(wait_for(url, proc, args.timeout), 2)
        driver = start_chromium(1400, 1300)  # tall enough for each tab with its results
        page = DemoPage(driver, url, timeout=args.timeout).open()
        results["page_loaded_seconds"] = round(time.perf_counter() - started, 2)
        shots = Path(args.screenshots) if args.screenshots else None
        if shots:
            shots.mkdir(parents=True, exist_ok=True)
        unified = bool(page._all("#t2v-caption textarea"))
        results["unified"] = unified

        runs = []
        for attempt in ("first", "second"):
            t2v = page.text_to_video(args.prompt)
            runs.append({"tab": "t2v", "attempt": attempt, "seconds": round(t2v["seconds"], 2),
                         "video": [t2v["width"], t2v["height"], round(t2v["duration"], 3)],
                         "caption": t2v["caption"], "oracle": t2v["oracle"]})
            if shots and attempt == "first":
                driver.save_screenshot(str(shots / "t2v.png"))
        if unified:
            for attempt, example in (("first", 0), ("second", 1)):
                page.pick_example(example)
                v2t = page.caption()
                runs.append({"tab": "v2t", "attempt": attempt, "seconds": round(v2t["seconds"], 2),
                             "caption": v2t["caption"], "candidates": v2t["candidates"], "oracle": v2t["oracle"]})
                if shots and attempt == "first":
                    driver.save_screenshot(str(shots / "v2t.png"))
            for attempt in ("first", "second"):
                joint = page.joint(args.prompt)
                runs.append({"tab": "joint", "attempt": attempt, "seconds": round(joint["seconds"], 2),
                             "first_step_seconds": round(joint["first_step_seconds"], 2),
                             "caption": joint["caption"], "oracle": joint["oracle"]})
                if shots and attempt == "first":
                    page.set_joint_step(max(1, int(joint["canvas"].split(" of ")[1].split(":")[0]) // 2))
                    driver.save_screenshot(str(shots / "joint.png"))
        results["runs"] = runs
        results["external_requests"] = page.external_requests()
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    results["machine"] = machine_info()
    path = write_json(args.out, results)
    for run in results["runs"]:
        print(f"{run['tab']:5s} {run['attempt']:6s} {run['seconds']:7.2f} s")
    print(f"server ready in {results['server_ready_seconds']} s; external requests: {results['external_requests']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
