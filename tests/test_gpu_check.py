"""The native-size GPU check (benchmarks/gpu_check.py) runs on a CPU at toy sizes: its dry run, whole.

GPU time comes in short windows; the check must run there as it is. So the dry run takes every
section through its own subprocess and the same code as on a GPU (toy sizes, a CPU), and every case
row must report ok with the fields the GPU run is read for.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

# Fields each section's case rows carry, beyond gpu_check.ROW_FIELDS.
CASE_FIELDS = {
    "attn": ("policy", "task", "fwd_bwd_s", "sdpa_kernels"),
    "train": ("task", "checkpointing", "step_s"),
    "infer": (),
    "vae": ("shape",),
    "umt5": (),
    "fsdp": ("logged_steps", "checkpoints", "checkpoint_format"),
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.perf_counter()
    summary = gpu_check.main(["--dry-run", "--out", str(out)])
    return summary, time.perf_counter() - start, out


def rows_of(summary, section):
    return [r for r in summary["rows"] if r["section"] == section]


def test_dry_run_every_section_reports_ok_with_its_fields(dry_run):
    summary, wall, out = dry_run
    assert summary["dry_run"] is True and summary["provenance"]["commit"]
    assert summary["sections"] == {name: "ok" for name in gpu_check.SECTIONS}, summary["sections"]
    assert summary["cases_failed"] == [] and summary["cases_failed_as_expected"] == []
    # What was written is what was returned: the JSON lines and the summary.
    lines = [json.loads(x) for x in (out / "gpu_check_native_dry_run.jsonl").read_text().splitlines()]
    assert lines == json.loads((out / "gpu_check_native_dry_run.json").read_text())["rows"] == summary["rows"]
    env = rows_of(summary, "env")[0]
    assert env["packages"]["missing"] == [] and set(env["packages"]["versions"]) == set(gpu_check.PACKAGES)
    for section, fields in CASE_FIELDS.items():
        cases = [r for r in rows_of(summary, section) if "outcome" in r or section == "fsdp"]
        assert cases, section
        for row in cases:
            missing = [f for f in (*gpu_check.ROW_FIELDS, *fields) if f not in row]
            assert not missing, (section, row["case"], missing)
            assert row["ok"] is True, row
            assert row["s"] >= 0
    # The GPU limits stay under 8 minutes in all.
    assert sum(gpu_check.SECTIONS.values()) <= 480
    print(f"dry run: {wall:.1f} s wall, sections {[(r['case'], r['s']) for r in rows_of(summary, 'run')]}")


def test_dry_run_covers_every_attention_policy_task_and_path(dry_run):
    summary = dry_run[0]
    attn = {r["case"]: r for r in rows_of(summary, "attn") if "task" in r}
    policies = gpu_check.attention_policies()
    assert "clean_isolated" in policies
    for policy in (*policies, "clean_isolated+text_key_bias"):
        for task in gpu_check.TASKS:
            row = attn[f"{policy}/{task}"]
            # The profiler saw the attention operators that ran.
            assert any("scaled_dot_product" in k for k in row["sdpa_kernels"]), row
    train = {r["case"]: r for r in rows_of(summary, "train")}
    for task in gpu_check.TASKS:
        assert len(train[f"{task}_checkpointed"]["step_s"]) == 2
    assert train["model"]["joint_step_flops"] > 0 and train["joint_checkpointed"]["tflop_per_s"] >= 0
    # At 81 frames it is not expected to fit (ok either way); on a CPU at toy sizes it simply runs.
    assert train["joint_no_checkpointing"]["expected"] == "OOM" and train["joint_no_checkpointing"]["outcome"] == "ran"
    infer = {r["case"]: r for r in rows_of(summary, "infer")}
    z = gpu_check.sizes(True)
    assert infer["pipeline_generate_caption_joint"]["frames_shape"] == [z["frames"], z["height"], z["width"], 3]
    assert infer["clean_isolated_prefill_step_text_4"]["kv_cache_gib"] >= 0
    assert infer["published_t2v_2_steps_guided"]["nfe"] == 2  # batched guidance: one call per step
    vae = {r["case"]: r for r in rows_of(summary, "vae")}
    assert vae["decode_bf16"]["shape"] == vae["decode_fp32"]["shape"] == [1, 3, z["frames"], z["height"], z["width"]]
    assert vae["encode_4_bf16"]["shape"][0] == 4
    umt5 = {r["case"]: r for r in rows_of(summary, "umt5")}
    assert umt5["encode_bf16"]["finite"] and umt5["encode_bf16"]["rel_err"] < 0.1
    fsdp = {r["case"]: r for r in rows_of(summary, "fsdp")}
    assert all(r["checkpoint_format"] == "dcp" and r["world_size"] == 1 for r in fsdp.values())
    resumed = fsdp["knowledge_recall_resumed_from_2"]
    assert resumed["logged_steps"] == [1, 2, 3, 4] and resumed["resume_exact"] is True


def test_a_section_past_its_limit_is_stopped_and_the_next_one_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.DRY_LIMITS, "fsdp", 0.5)
    monkeypatch.setitem(gpu_check.DRY_LIMITS, "umt5", 0.5)
    runs = gpu_check.run_sections(["fsdp", "umt5"], tmp_path / "rows.jsonl", dry=True)
    assert [(r["case"], r["status"]) for r in runs] == [("fsdp", "timeout"), ("umt5", "timeout")]


def test_a_failing_case_is_a_row_not_a_crash(tmp_path):
    rows = gpu_check.Rows(tmp_path / "rows.jsonl")

    def boom():
        raise RuntimeError("broken path")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    failed = rows.measure("train", "broken", boom)
    expected = rows.measure("train", "too_big", oom, expect_oom=True)
    unexpected = rows.measure("train", "fits_elsewhere", oom)
    waiting = rows.measure("attn", "masked", oom, until="mask-free attention lands")
    passing = rows.measure("attn", "masked_but_fits", lambda: {"x": 1}, until="mask-free attention lands")
    assert (failed["ok"], failed["error"], failed["detail"]) == (False, "RuntimeError", "broken path")
    assert (expected["ok"], expected["outcome"], expected["expected"]) == (True, "OOM", "OOM")
    assert (unexpected["ok"], unexpected["outcome"]) == (False, "OOM")
    assert not waiting["ok"] and waiting["expected_failure"] == "expected to fail until mask-free attention lands"
    assert passing["ok"] and passing["x"] == 1 and "expected_failure" not in passing
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 5


def test_missing_packages_are_named_and_a_gpu_run_needs_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.PACKAGES, "no_such_module_xyz", "no-such-package-xyz")
    report = gpu_check.ensure_packages(tmp_path / "no-wheels")  # no wheels folder: nothing installed
    assert report["missing"] == ["no_such_module_xyz"] and report["installed"] == []
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main(["--out", str(tmp_path)])
        assert "no CUDA device" in capsys.readouterr().err
