"""The web demo served for real: what can (not) be read through it, where it listens, and a person's
session in a headless Chromium (marked `browser`).

One server per module on a free port, on a tiny unified model (tests/pipeline_helpers.py), with
its upload folder in pytest's temporary folder. Without Chromium the browser test skips, unless
UNIVIGU_REQUIRE_BROWSER=1 (set by .ci/run), where it fails.
"""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pipeline_helpers import prompt_encoder, tiny_model_dir

pytest.importorskip("gradio", reason="the web extra is not installed (pip install -e '.[web]')")

from univigu.pipeline import UniViGUPipeline  # noqa: E402
from univigu.web import app as web  # noqa: E402

REQUIRE_BROWSER = os.environ.get("UNIVIGU_REQUIRE_BROWSER") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    upload_dir = web.prepare_upload_folder(root)
    pipe = UniViGUPipeline.from_pretrained(tiny_model_dir(root / "model"), device="cpu", dtype="fp32",
                                           prompt_encoder=prompt_encoder())
    app = web.build_app(pipe, upload_dir, model_name="tiny test model")
    port = free_port()
    web.launch(app, port=port, block=False, quiet=True)  # the default host
    secret = root / "secret.txt"
    secret.write_text("not for the browser")
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "port": port, "upload_dir": upload_dir, "root": root,
               "secret": secret, "model_dir": root / "model", "app": app}
    finally:
        app.close()
        web.remove_folder(upload_dir)
        os.environ.pop("GRADIO_TEMP_DIR", None)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_the_server_listens_on_localhost_only_by_default(server):
    port = server["port"]
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                listening.append(address)
    assert listening == ["0100007F"], listening  # 127.0.0.1 and nothing else (no 0.0.0.0, no ::)
    assert web.launch.__defaults__[0] == "127.0.0.1" == web.DEFAULT_HOST
    # Another address of this machine, if it has one, is refused.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            own = s.getsockname()[0]
        except OSError:
            own = None
    if own and not own.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((own, port), timeout=2).close()


def test_no_path_outside_the_upload_folder_is_readable(server):
    base, secret = server["url"].rstrip("/"), server["secret"]
    output = server["upload_dir"] / "outputs" / "probe.webm"
    output.write_bytes(b"\x1a\x45\xdf\xa3 made for the page")
    status, body = _get(f"{base}/gradio_api/file={output}")
    assert status == 200 and body.startswith(b"\x1a\x45\xdf\xa3")  # the folder's own files are served
    here = Path(__file__).resolve()
    targets = [secret, Path("/etc/passwd"), server["model_dir"] / "model_index.json", here]
    contents = [t.read_bytes()[:64] for t in targets if t.is_file()]
    up = server["upload_dir"]
    attempts = [*map(str, targets), f"{up}/../{secret.name}", f"{up}/outputs/../../{secret.name}",
                f"{up}/%2e%2e/{secret.name}", f"{up}/..%2f{secret.name}", "../" * 12 + "etc/passwd",
                "..%2f" * 12 + "etc%2fpasswd"]
    for path in attempts:
        for route in ("gradio_api/file=", "file=", "static/", "assets/", ""):
            status, body = _get(f"{base}/{route}{path}")
            assert not any(content in body for content in contents), (route, path, status)
    # The page itself loads, without anything from another host in it.
    status, body = _get(base + "/")
    assert status == 200
    for cdn in (b"fonts.googleapis", b"cdn.jsdelivr", b"unpkg.com", b"cdnjs"):
        assert cdn not in body


def test_model_jobs_share_one_bounded_concurrency_group_behind_a_bounded_queue(server):
    app = server["app"]
    jobs = [fn for fn in app.fns.values() if fn.concurrency_id == web.MODEL_GROUP]
    names = {fn.name for fn in jobs}
    assert {"t2v", "v2t", "joint"} <= names, names
    assert all(fn.concurrency_limit == 1 for fn in jobs)
    assert app._queue.max_size == 16


def test_handlers_give_one_message_for_bad_input(server):
    gr = web._gradio()
    runner = server["app"].univigu_runner
    with pytest.raises(web.InputError, match="The prompt is empty"):
        runner.text_to_video("  ", 0, 2, 1.0)
    with pytest.raises(web.InputError, match="Steps must be a whole number from 1 to 200"):
        runner.text_to_video("a small red circle moves up", 0, 0, 1.0)
    with pytest.raises(web.InputError, match="Upload a video first"):
        runner.video_to_text(None, None, 0, 2, 1)
    wrapped = web._friendly(lambda: (_ for _ in ()).throw(RuntimeError("secret internals at /srv")))
    with pytest.raises(gr.Error) as err:
        wrapped()
    assert "secret" not in str(err.value) and "server" in str(err.value)


@pytest.mark.browser
def test_a_person_uses_the_three_tabs_in_chromium(server, tmp_path):
    from univigu.web.browser import DemoPage, find_chromium, start_chromium

    if find_chromium() is None:
        if REQUIRE_BROWSER:
            pytest.fail("Chromium is required here (UNIVIGU_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium")
    started = time.perf_counter()
    driver = start_chromium()
    try:
        page = DemoPage(driver, server["url"], timeout=60).open()

        # Text to video: the video plays, at its size and length, with the model's own caption.
        t2v = page.text_to_video("a large green circle moves up")
        assert t2v["error"] is None and t2v["played"]
        assert (t2v["width"], t2v["height"]) == (256, 256)  # 16 x 16 upscaled
        assert t2v["duration"] == pytest.approx(5 / 8, abs=0.05)  # 5 frames at 8 fps
        assert t2v["caption"].strip() and "Oracle reads the video as" in t2v["oracle"]
        # A prompt the model's tokenizer cannot take: one message, no traceback.
        page.type_prompt("t2v-prompt", "a small red zeppelin moves up")
        page._css("#t2v-run").click()
        message = page.wait_error("does not know the word")
        assert "'zeppelin'" in message and "Traceback" not in message
        page.close_errors()

        # Video to text: a corrupt upload gets one clear message, and is deleted.
        corrupt = tmp_path / "corrupt.mp4"
        corrupt.write_bytes(os.urandom(4096))
        page.upload(corrupt)
        page._css("#v2t-run").click()
        message = page.wait_error("'corrupt.mp4' is not a video this demo can read")
        assert "Traceback" not in message and str(server["upload_dir"]) not in message
        leftover = [p for p in server["upload_dir"].rglob("*") if p.is_file() and "outputs" not in p.parts]
        assert leftover == []
        page.close_errors()
        # ... and a ShapesWorld example gets a caption and its verified candidates.
        example = page.pick_example(1)
        assert example["error"] is None and example["width"] == 256
        v2t = page.caption()
        assert v2t["caption"].strip() and len(v2t["candidates"]) == 4
        assert sum("kept" in row for row in v2t["candidates"]) == 1
        assert "ShapesWorld's own caption" in v2t["oracle"]

        # Joint: the steps stream in, then the video and its caption; the slider goes back in time.
        joint = page.joint("a small blue square moves down")
        # (The tiny model's 3 steps may all stream in before the page is polled.)
        assert re.match(r"step [123] of 3: ", joint["first_step"]) and joint["error"] is None and joint["played"]
        assert joint["caption"].strip() and joint["canvas"].startswith("step 3 of 3")
        assert page.set_joint_step(1).startswith("step 1 of 3")

        # Nothing came from anywhere but the server.
        assert page.external_requests() == []
    finally:
        driver.quit()
    assert time.perf_counter() - started < 90
