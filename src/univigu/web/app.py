"""The Gradio page of `univigu serve`: text-to-video, video-to-text and joint generation.

```python
from univigu.web.app import build_app, launch, prepare_upload_folder
upload_dir = prepare_upload_folder()        # before Gradio is imported: uploads land only here
app = build_app(UniViGUPipeline.from_pretrained("runs/demo/capability_refinement/model"), upload_dir)
launch(app)                                 # http://127.0.0.1:7860
```

Offline by construction: analytics off, no share link, no server-side rendering (no Node), the
default theme's fonts are the ones Gradio ships, and nothing else on the page comes from outside.
Every model call shares one concurrency group (`--concurrency` jobs at a time, the rest queued up to
`--max_queue`). Uploads and the videos made for the page live in one temporary folder (Gradio's
cache, `GRADIO_TEMP_DIR`); uploads are deleted once read, the rest by Gradio's cache cleaning and
when the server stops. Gradio serves files from that folder only, never by an arbitrary path.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from ..config import WorldConfig
from ..data import shapesworld as sw
from .media import (InputError, check_prompt, check_upload, frame_strip, oracle_reading, remove_upload,
                    render_canvas, stack_rows, write_display_video)

log = logging.getLogger("univigu.web")

# Read by Gradio at import time; set here so that importing this module is enough.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MODEL_GROUP = "model"  # the concurrency group every model call joins


def prepare_upload_folder(parent: str | Path | None = None) -> Path:
    """A fresh temporary folder for uploads and outputs, made Gradio's cache (GRADIO_TEMP_DIR).
    Call before `import gradio` (a few Gradio modules read the variable at import time)."""
    folder = Path(tempfile.mkdtemp(prefix="univigu-web-", dir=parent)).resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


@functools.lru_cache(maxsize=1)
def _gradio():
    try:
        import gradio as gr
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the web demo needs Gradio: pip install -e \".[web]\"") from err
    return gr


def _user_error(err: BaseException):
    """The one message the page shows for an exception."""
    gr = _gradio()
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, ValueError):  # InputError and the pipeline's, codec's, tokenizer's errors
        return gr.Error(str(err), print_exception=False)
    log.exception("request failed", exc_info=err)
    return gr.Error("Something went wrong on the server (its log has the details).", print_exception=False)


def _friendly(fn):
    """Handlers raise one clear gr.Error, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - shown to the user as one line
            raise _user_error(err) from None
    return wrapper


def _friendly_stream(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise _user_error(err) from None
    return wrapper


class DemoRunner:
    """What the page's buttons do, on one pipeline; usable without a browser."""

    def __init__(self, pipe, upload_dir: str | Path, *, max_upload_mb: float = 50, max_seconds: float = 60,
                 max_frames: int = 1800, num_examples: int = 6):
        self.pipe = pipe
        self.upload_dir = Path(upload_dir).resolve()
        self.output_dir = self.upload_dir / "outputs"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_upload_mb * 2**20)
        self.max_seconds, self.max_frames = max_seconds, max_frames
        self.world: WorldConfig = pipe.world
        self.lock = threading.Lock()  # one model call at a time, whatever the queue allows
        self.examples = sw.make_samples(num_examples, seed=2024, world=self.world, split="test")

    @property
    def unified(self) -> bool:
        return self.pipe.has_text_stream

    # ------------------------------------------------------------------ helpers
    def _prompt(self, prompt: str) -> str:
        if self.unified:
            return check_prompt(prompt, self.pipe.tokenizer, self.pipe.transformer.config.text_length)
        return check_prompt(prompt)

    @staticmethod
    def _int(value, name: str, lo: int, hi: int) -> int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a whole number, got {value!r}.") from None
        if not number.is_integer() or not lo <= number <= hi:
            raise InputError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}.")
        return int(number)

    @staticmethod
    def _float(value, name: str, lo: float, hi: float) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a number, got {value!r}.") from None
        if not lo <= number <= hi:
            raise InputError(f"{name} must lie between {lo:g} and {hi:g}, got {value!r}.")
        return number

    def video_file(self, frames: np.ndarray) -> str:
        return str(write_display_video(self.output_dir / f"{uuid.uuid4().hex}.webm", frames, self.world.fps))

    def _timing(self, start: float, nfe: int) -> str:
        return f"{time.perf_counter() - start:.1f} s on {self.pipe.device}, {nfe} model evaluations"

    # ------------------------------------------------------------------ T2V
    def text_to_video(self, prompt, seed, steps, guidance, progress=None):
        """-> (video path, the model's caption or "", oracle markdown, timing)."""
        prompt = self._prompt(prompt)
        seed = self._int(seed, "Seed", 0, 2**31 - 1)
        steps = self._int(steps, "Steps", 1, 200)
        guidance = self._float(guidance, "Guidance", 1.0, 20.0)

        def step_end(pipe, i, s, state):
            if progress is not None:
                progress((i + 1, steps), desc="video steps")

        start = time.perf_counter()
        with self.lock:
            out = self.pipe.generate(prompt, steps=steps, guidance_scale=guidance, seed=seed,
                                     with_caption=self.unified, callback_on_step_end=step_end)
        frames = out.frames[0]
        caption = out.captions[0] if out.captions else ""
        texts = [("the prompt", prompt)] + ([("the model's caption", caption)] if caption else [])
        oracle = oracle_reading(frames, self.world, texts)
        return self.video_file(frames), caption, oracle, self._timing(start, out.nfe)

    # ------------------------------------------------------------------ V2T
    def example_choices(self) -> list[tuple[str, int]]:
        return [(s.prompt, i) for i, s in enumerate(self.examples)]

    def example_frames(self, index) -> np.ndarray:
        index = self._int(index, "Example", 0, len(self.examples) - 1)
        return sw.render(self.examples[index].scene, self.world)

    def video_to_text(self, upload, example, seed, steps, candidates, progress=None):
        """-> (caption, candidate rows [caption, score, kept], oracle markdown, timing).
        `example` (an index into the ShapesWorld examples) wins over `upload` when both are set."""
        seed = self._int(seed, "Seed", 0, 2**31 - 1)
        steps = self._int(steps, "Steps", 1, 200)
        k = self._int(candidates, "Candidates", 1, 16)
        if example is not None and example != "":
            frames = self.example_frames(example)
            truth = self.examples[int(example)].caption
            videos = self.pipe.load_videos(frames)
        else:
            truth = None
            try:
                check_upload(upload, self.upload_dir, self.max_bytes, self.max_seconds, self.max_frames)
                name = Path(upload).name
                try:
                    videos = self.pipe.load_videos(str(upload))
                except ValueError as err:
                    raise InputError(f"{name!r} cannot be read: {str(err).replace(str(upload), name)}") from None
            finally:
                remove_upload(upload, self.upload_dir)  # read once, then gone
        if progress is not None:
            progress(0.1, desc=f"sampling {k} caption{'s' if k > 1 else ''}")
        start = time.perf_counter()
        with self.lock:
            out = self.pipe.caption(videos, steps=steps, seed=seed, candidates=k)
        caption = out.captions[0]
        texts, scores = out.candidates[0], out.candidate_scores[0]
        kept = texts.index(caption)
        rows = [[text, "" if score is None else f"{score:.4f}", "kept" if j == kept else ""]
                for j, (text, score) in enumerate(zip(texts, scores))]
        oracle = oracle_reading(videos[0].cpu(), self.world, [("the caption", caption)])
        if truth:
            oracle += f"  \nShapesWorld's own caption: *{truth}*"
        return caption, rows, oracle, self._timing(start, out.nfe)

    # ------------------------------------------------------------------ joint
    def joint(self, prompt, seed, steps, guidance):
        """Yields ("step", i, s, image, canvas text) per sampling step, then
        ("done", video path, caption, oracle markdown, timing)."""
        prompt = self._prompt(prompt)
        seed = self._int(seed, "Seed", 0, 2**31 - 1)
        steps = self._int(steps, "Steps", 1, 200)
        guidance = self._float(guidance, "Guidance", 1.0, 20.0)
        events: queue.Queue = queue.Queue()
        result: dict = {}

        def step_end(pipe, i, s, state):
            now = pipe.decode_latents(state["video"][:1])[0]
            predicted = pipe.decode_latents(state["prediction"][:1])[0]
            image = stack_rows([frame_strip(now), frame_strip(predicted)])
            events.put(("step", i, s, image, render_canvas(pipe.tokenizer, state["tokens"][0].tolist())))

        def work():
            try:
                with self.lock:
                    result["out"] = self.pipe.joint(prompt, steps=steps, guidance_scale=guidance, seed=seed,
                                                    callback_on_step_end=step_end)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = err
            finally:
                events.put(("end",))

        start = time.perf_counter()
        worker = threading.Thread(target=work, name="univigu-joint", daemon=True)
        worker.start()
        while (event := events.get())[0] != "end":
            yield event
        worker.join()
        if "error" in result:
            raise result["error"]
        out = result["out"]
        frames = out.frames[0]
        oracle = oracle_reading(frames, self.world, [("the prompt", prompt), ("its caption", out.captions[0])])
        yield "done", self.video_file(frames), out.captions[0], oracle, self._timing(start, out.nfe)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

CSS = """
.univigu-strip img { image-rendering: pixelated; }
video { image-rendering: pixelated; }
"""


def build_app(pipe, upload_dir: str | Path, *, model_name: str = "", concurrency: int = 1, max_queue: int = 16,
              max_upload_mb: float = 50, max_seconds: float = 60, max_frames: int = 1800):
    """The Gradio Blocks of the demo on `pipe`; `upload_dir` is Gradio's cache (see
    `prepare_upload_folder`)."""
    gr = _gradio()
    runner = DemoRunner(pipe, upload_dir, max_upload_mb=max_upload_mb, max_seconds=max_seconds,
                        max_frames=max_frames)
    sampler, world = pipe.sampler, pipe.world
    kind = ("a unified model (video and text)" if runner.unified
            else "a video-only generator (text-to-video only; `make demo` grows it into a unified model)")
    prompts = [[s.prompt] for s in runner.examples]
    model_events = dict(concurrency_limit=concurrency, concurrency_id=MODEL_GROUP)

    with gr.Blocks(title="univigu demo", analytics_enabled=False, delete_cache=(300, 1800)) as app:
        app.univigu_runner = runner
        gr.Markdown(f"# univigu: one flow-matching video transformer that also writes text\n"
                    f"Model `{model_name or 'in memory'}`: {kind}; {world.width}x{world.height} pixels, "
                    f"{world.frames} frames at {world.fps} fps, on {pipe.device}. "
                    "Prompts follow ShapesWorld: a size, a colour, a shape and a motion.")
        with gr.Tabs():
            # ---------------------------------------------------------- T2V
            with gr.Tab("Text to video", id="t2v"):
                with gr.Row():
                    with gr.Column():
                        t2v_prompt = gr.Textbox(label="Prompt", value=runner.examples[0].prompt, max_lines=2,
                                                elem_id="t2v-prompt")
                        with gr.Row():
                            t2v_seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                            t2v_steps = gr.Slider(1, 100, value=sampler.video_steps, step=1, label="Steps")
                            t2v_guidance = gr.Slider(1.0, 10.0, value=sampler.guidance_scale, step=0.5,
                                                     label="Guidance")
                        t2v_button = gr.Button("Generate", variant="primary", elem_id="t2v-run")
                        gr.Examples(prompts, inputs=[t2v_prompt], label="ShapesWorld prompts")
                    with gr.Column():
                        t2v_video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, height=320,
                                             buttons=["download"], elem_id="t2v-video")
                        t2v_caption = gr.Textbox(label="The model's own caption of its video",
                                                 visible=runner.unified, interactive=False,
                                                 elem_id="t2v-caption")
                        t2v_oracle = gr.Markdown(elem_id="t2v-oracle")
                        t2v_time = gr.Markdown(elem_id="t2v-time")

                @_friendly
                def t2v(prompt, seed, steps, guidance, progress=gr.Progress()):
                    return runner.text_to_video(prompt, seed, steps, guidance, progress)

                gr.on([t2v_button.click, t2v_prompt.submit], t2v, [t2v_prompt, t2v_seed, t2v_steps, t2v_guidance],
                      [t2v_video, t2v_caption, t2v_oracle, t2v_time], **model_events)

            # ---------------------------------------------------------- V2T
            with gr.Tab("Video to text", id="v2t"):
                if not runner.unified:
                    gr.Markdown("Captioning needs a unified model (this one has no text stream): "
                                "run `make demo`, then `univigu serve` picks it up.")
                else:
                    with gr.Row():
                        with gr.Column():
                            v2t_video = gr.Video(label="Video (upload one, or pick a ShapesWorld example)",
                                                 sources=["upload"], autoplay=True, loop=True, height=320,
                                                 buttons=["download"], elem_id="v2t-video")
                            v2t_example = gr.Dropdown(runner.example_choices(), value=None,
                                                      label="ShapesWorld example", elem_id="v2t-example")
                            example_state = gr.State(None)
                            with gr.Row():
                                v2t_seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                                v2t_steps = gr.Slider(1, 100, value=sampler.text_steps, step=1, label="Steps")
                                v2t_k = gr.Slider(1, 8, value=max(4, sampler.caption_candidates), step=1,
                                                  label="Candidates (verified by the video flow)")
                            v2t_button = gr.Button("Caption", variant="primary", elem_id="v2t-run")
                        with gr.Column():
                            v2t_caption = gr.Textbox(label="Caption", interactive=False, elem_id="v2t-caption")
                            v2t_table = gr.Dataframe(headers=["candidate", "video flow loss", "kept"],
                                                     datatype=["str", "str", "str"], interactive=False,
                                                     column_widths=["70%", "20%", "10%"], wrap=True,
                                                     label="Candidates and their verification scores "
                                                           "(lower loss = the generator finds it more likely)",
                                                     elem_id="v2t-candidates")
                            v2t_oracle = gr.Markdown(elem_id="v2t-oracle")
                            v2t_time = gr.Markdown(elem_id="v2t-time")

                    @_friendly
                    def pick_example(index):
                        if index is None or index == "":
                            return gr.skip(), None
                        return runner.video_file(runner.example_frames(index)), index

                    v2t_example.input(pick_example, [v2t_example], [v2t_video, example_state])
                    v2t_video.upload(lambda: (None, None), None, [example_state, v2t_example])
                    v2t_video.clear(lambda: (None, None), None, [example_state, v2t_example])

                    @_friendly
                    def v2t(upload, example, seed, steps, k, progress=gr.Progress()):
                        return runner.video_to_text(upload, example, seed, steps, k, progress)

                    v2t_button.click(v2t, [v2t_video, example_state, v2t_seed, v2t_steps, v2t_k],
                                     [v2t_caption, v2t_table, v2t_oracle, v2t_time], **model_events)

            # ---------------------------------------------------------- joint
            with gr.Tab("Joint", id="joint"):
                if not runner.unified:
                    gr.Markdown("Joint generation needs a unified model (this one has no text stream): "
                                "run `make demo`, then `univigu serve` picks it up.")
                else:
                    with gr.Row():
                        with gr.Column():
                            joint_prompt = gr.Textbox(label="Prompt", value=runner.examples[1].prompt,
                                                      max_lines=2, elem_id="joint-prompt")
                            with gr.Row():
                                joint_seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                                joint_steps = gr.Slider(1, 100, value=sampler.video_steps, step=1, label="Steps")
                                joint_guidance = gr.Slider(1.0, 10.0, value=sampler.guidance_scale, step=0.5,
                                                           label="Guidance")
                            joint_button = gr.Button("Generate video and caption", variant="primary",
                                                     elem_id="joint-run")
                            gr.Examples(prompts, inputs=[joint_prompt], label="ShapesWorld prompts")
                            joint_video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False,
                                                   height=320, buttons=["download"], elem_id="joint-video")
                            joint_caption = gr.Textbox(label="Caption generated with it", interactive=False,
                                                       elem_id="joint-caption")
                            joint_oracle = gr.Markdown(elem_id="joint-oracle")
                            joint_time = gr.Markdown(elem_id="joint-time")
                        with gr.Column():
                            gr.Markdown("**How they co-evolve.** Top: the sample at each step; bottom: the "
                                        "clean video that step predicts. Below: the text canvas "
                                        "(\u2592 = still masked).")
                            joint_strip = gr.Image(label="Frames at this step", interactive=False, type="numpy", buttons=["download"],
                                                   elem_classes=["univigu-strip"], elem_id="joint-strip")
                            joint_canvas = gr.Textbox(label="Text at this step", interactive=False,
                                                      elem_id="joint-canvas")
                            joint_step = gr.Slider(1, max(2, sampler.video_steps), value=1, step=1,
                                                   label="Step", interactive=False, elem_id="joint-step")
                            history = gr.State([])

                    @_friendly_stream
                    def joint(prompt, seed, steps, guidance, progress=gr.Progress()):
                        frames_seen = []
                        for event in runner.joint(prompt, seed, steps, guidance):
                            if event[0] == "step":
                                _, i, s, image, text = event
                                frames_seen.append((image, text))
                                progress((i + 1, int(steps)), desc="joint steps")
                                yield (image, f"step {i + 1} of {int(steps)}: {text}",
                                       gr.Slider(minimum=1, maximum=max(2, int(steps)), value=i + 1,
                                                 interactive=False),
                                       gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
                            else:
                                _, video, caption, oracle, timing = event
                                yield (gr.skip(), gr.skip(), gr.Slider(interactive=True), video, caption, oracle,
                                       timing, frames_seen)

                    gr.on([joint_button.click, joint_prompt.submit], joint,
                          [joint_prompt, joint_seed, joint_steps, joint_guidance],
                          [joint_strip, joint_canvas, joint_step, joint_video, joint_caption, joint_oracle,
                           joint_time, history], **model_events)

                    def show_step(step, seen):
                        if not seen:
                            return gr.skip(), gr.skip()
                        i = min(max(int(step), 1), len(seen)) - 1
                        image, text = seen[i]
                        return image, f"step {i + 1} of {len(seen)}: {text}"

                    gr.on([joint_step.input, joint_step.release], show_step, [joint_step, history],
                          [joint_strip, joint_canvas], show_progress="hidden")
    app.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    return app


def launch(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, max_upload_mb: float = 50,
           block: bool = True, quiet: bool = False):
    """Serve the page on host:port (localhost unless told otherwise); no share link, no SSR."""
    gr = _gradio()
    return app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False,
                      prevent_thread_lock=not block, quiet=quiet, max_file_size=int(max_upload_mb * 2**20),
                      ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False,
                      footer_links=["settings"], theme=gr.themes.Default(), css=CSS)


def remove_folder(folder: str | Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
