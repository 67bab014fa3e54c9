"""Result files that know how they were made (issue 66, cases 1-4): the settings sidecar, resume
and merge refusing to mix runs, and no command losing finished rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from run_fixtures import certify_argv, make_run_inputs, rows_without_time

from drs_ext import cli
from drs_ext.io.results import HEADER, TsvWriter, UncheckedSettingsWarning, merge_tsv, read_tsv
from drs_ext.io.settings import (
    file_sha256,
    read_sidecar,
    settings_differences,
    sidecar_path,
    write_sidecar,
)


@pytest.fixture(scope="module", autouse=True)
def cli_on_cpu():
    with pytest.MonkeyPatch.context() as patch:
        for command in cli.SUBCOMMANDS:
            if hasattr(command, "default_device"):
                patch.setattr(command, "default_device", lambda: "cpu")
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("settings"))


def run(argv) -> int:
    return cli.main([str(a) for a in argv])


def error_of(capsys, argv) -> str:
    assert run(argv) == 2
    return capsys.readouterr().err


SETTINGS = {"method": "rs", "sigma": [0.25], "n": 100, "alpha": 0.001, "shard": 0, "shards": 1}


# -- the sidecar ---------------------------------------------------------------------------------


def test_certify_records_its_settings_next_to_an_unchanged_cohen_tsv(inputs, tmp_path):
    out = tmp_path / "drs.tsv"
    argv = certify_argv(inputs, out, "--alpha", "0.01", "--seed", "7", "--skip", "2")
    assert run([*argv, "--checkpoint", *inputs["drs"][::-1]]) == 0
    recorded = read_sidecar(out)
    assert recorded is not None and sidecar_path(out).name == "drs.tsv.settings.json"
    settings = recorded["settings"]
    assert settings["method"] == "drs" and settings["sigma"] == [0.2, 0.2]
    assert settings["fill"] == "pair" and settings["autocast"] is None
    assert (settings["n0"], settings["n"], settings["alpha"], settings["seed"]) == (4, 8, 0.01, 7)
    assert (settings["data"], settings["split"]) == (inputs["data"], "test")
    assert (settings["skip"], settings["max"], settings["shard"], settings["shards"]) == (
        2,
        -1,
        0,
        1,
    )
    # Content digests, independent of the order the checkpoints were named in.
    assert settings["checkpoint_sha256"] == sorted(file_sha256(p) for p in inputs["drs"])
    assert settings["drs_ext_version"] == __import__("drs_ext").__version__
    assert recorded["run"]["selected"] == 4 == len(read_tsv(out))
    # The TSV itself is Cohen et al.'s six columns, untouched by the sidecar.
    assert out.read_text().split("\n")[0] == HEADER
    assert [p.name for p in tmp_path.glob("*.tsv")] == ["drs.tsv"]


def test_pandas_reads_the_tsv_as_cohen_analyze_does(inputs, tmp_path):
    pandas = pytest.importorskip("pandas")
    assert run(certify_argv(inputs, tmp_path / "rs.tsv")) == 0
    frame = pandas.read_csv(tmp_path / "rs.tsv", delimiter="\t")
    assert list(frame.columns) == ["idx", "label", "predict", "radius", "correct", "time"]
    assert len(frame) == len(read_tsv(tmp_path / "rs.tsv"))


def test_settings_differences_name_every_differing_key():
    other = {**SETTINGS, "n": 5000, "alpha": 0.2, "method": "drs", "fill": "pair"}
    lines = settings_differences(SETTINGS, other, names=("file", "run"))
    assert lines == [
        "alpha: 0.001 (file) vs 0.2 (run)",
        'fill: (not recorded) (file) vs "pair" (run)',
        'method: "rs" (file) vs "drs" (run)',
        "n: 100 (file) vs 5000 (run)",
    ]
    assert (
        settings_differences(SETTINGS, {**SETTINGS, "shard": 3}, ignore=["shard"], names=("a", "b"))
        == []
    )


def test_a_damaged_sidecar_is_an_error_naming_it(tmp_path):
    (tmp_path / "r.tsv").write_text(HEADER + "\n")
    sidecar_path(tmp_path / "r.tsv").write_bytes(b"\xff{not json")
    with pytest.raises(ValueError, match=r"r.tsv.settings.json: not a readable settings file"):
        read_sidecar(tmp_path / "r.tsv")
    sidecar_path(tmp_path / "r.tsv").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a drs_ext settings file"):
        read_sidecar(tmp_path / "r.tsv")


# -- case 1: resume refuses a file made with other settings --------------------------------------


def test_resume_refuses_other_settings_naming_each(inputs, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    assert run(certify_argv(inputs, out, "--max", "3")) == 0
    before = out.read_bytes()
    # RS rows at n = 8 continued with DRS branches at n = 50, α = 0.2.
    argv = certify_argv(inputs, out, "--resume", "--n", "50", "--alpha", "0.2")
    err = error_of(capsys, [*argv, "--checkpoint", *inputs["drs"]])
    for line in (
        'method: "rs" (the file) vs "drs" (this run)',
        "n: 8 (the file) vs 50 (this run)",
        "alpha: 0.001 (the file) vs 0.2 (this run)",
        "sigma: [0.25] (the file) vs [0.2, 0.2] (this run)",
        'fill: null (the file) vs "pair" (this run)',
        "checkpoint_sha256:",
    ):
        assert line in err, line
    for changed, setting in (
        (["--seed", "3"], "seed: 0 (the file) vs 3 (this run)"),
        (["--checkpoint", inputs["rs_other"]], "checkpoint_sha256"),
        (["--autocast", "bf16"], 'autocast: null (the file) vs "bf16" (this run)'),
        (["--split", "train"], 'split: "test" (the file) vs "train" (this run)'),
    ):
        err = error_of(capsys, [*certify_argv(inputs, out, "--resume"), *changed])
        assert f"cannot resume {out}" in err and setting in err
        assert "method:" not in err  # only what differs is named
    assert out.read_bytes() == before
    # The same settings, and a larger --max, continue the file.
    assert run(certify_argv(inputs, out, "--resume", "--max", "5")) == 0
    assert [r.idx for r in read_tsv(out)] == list(range(5))
    assert read_sidecar(out)["settings"]["max"] == 5


def test_files_without_settings_still_resume_with_a_warning(inputs, tmp_path, capsys):
    out = tmp_path / "old.tsv"
    assert run(certify_argv(inputs, out, "--max", "3")) == 0
    full = rows_without_time(out)
    sidecar_path(out).unlink()  # a file from before the sidecar (or Cohen et al.'s code)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n")
    assert run(certify_argv(inputs, out, "--max", "3", "--resume")) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "cannot be checked" in err and "old.tsv" in err
    assert rows_without_time(out) == full
    assert read_sidecar(out) is None  # nothing claims settings for rows nobody checked
    with pytest.warns(UncheckedSettingsWarning, match="cannot be checked"):
        TsvWriter(out, resume=True, settings=SETTINGS).abandon()


# -- case 2: merge refuses mixed settings and incomplete shard sets -------------------------------


def test_merge_refuses_shards_of_different_runs(inputs, tmp_path, capsys):
    run(certify_argv(inputs, tmp_path / "p.tsv", "--shard", "0/2"))
    run(certify_argv(inputs, tmp_path / "p.tsv", "--shard", "1/2", "--n", "9", "--seed", "1"))
    parts = [tmp_path / "p.shard0of2.tsv", tmp_path / "p.shard1of2.tsv"]
    err = error_of(capsys, ["merge", tmp_path / "all.tsv", *parts])
    assert "refusing to merge files made with different settings" in err
    assert "n: 8 (" in err and "seed: 0 (" in err and "shard:" not in err
    assert not (tmp_path / "all.tsv").exists()


def test_merge_refuses_a_missing_or_unfinished_shard(inputs, tmp_path, capsys):
    for k in range(3):
        assert run(certify_argv(inputs, tmp_path / "p.tsv", "--shard", f"{k}/3")) == 0
    parts = [tmp_path / f"p.shard{k}of3.tsv" for k in range(3)]
    err = error_of(capsys, ["merge", tmp_path / "all.tsv", parts[0], parts[2]])
    assert "shard 1 of 3 missing" in err and "--allow-incomplete" in err
    # The same check from the names alone, for files without settings.
    for part in parts:
        (tmp_path / f"bare.{part.name.split('.', 1)[1]}").write_text(part.read_text())
    err = error_of(capsys, ["merge", tmp_path / "all.tsv", *sorted(tmp_path.glob("bare.*"))[:2]])
    assert "shard 2 of 3 missing" in err and "no settings file" in err
    # An interrupted shard: its sidecar says how many rows its selection holds.
    lines = parts[1].read_text().splitlines(keepends=True)
    parts[1].write_text("".join(lines[:-1]))
    err = error_of(capsys, ["merge", tmp_path / "all.tsv", *parts])
    assert f"{parts[1]} holds 2 of the 3 rows" in err and "--resume" in err
    assert not (tmp_path / "all.tsv").exists()
    assert run(["merge", tmp_path / "all.tsv", *parts, "--allow-incomplete"]) == 0
    assert "incomplete set of shards" in capsys.readouterr().err
    assert [r.idx for r in read_tsv(tmp_path / "all.tsv")] == [0, 1, 2, 3, 4, 5, 6]


def test_merge_of_complete_shards_records_the_unsharded_settings(inputs, tmp_path):
    assert run(certify_argv(inputs, tmp_path / "one.tsv")) == 0
    for k in range(2):
        assert run(certify_argv(inputs, tmp_path / "p.tsv", "--shard", f"{k}/2")) == 0
    parts = [tmp_path / f"p.shard{k}of2.tsv" for k in (1, 0)]
    assert run(["merge", tmp_path / "all.tsv", *parts]) == 0
    assert rows_without_time(tmp_path / "all.tsv") == rows_without_time(tmp_path / "one.tsv")
    merged, single = read_sidecar(tmp_path / "all.tsv"), read_sidecar(tmp_path / "one.tsv")
    assert merged["settings"] == single["settings"] and merged["run"]["selected"] == 8
    # So the merged file resumes as the single run would (nothing left to do).
    assert run(certify_argv(inputs, tmp_path / "all.tsv", "--resume")) == 0


def test_merge_checks_names_against_settings(tmp_path):
    write_sidecar(tmp_path / "x.shard0of2.tsv", {**SETTINGS, "shard": 1, "shards": 2})
    (tmp_path / "x.shard0of2.tsv").write_text(HEADER + "\n")
    with pytest.raises(ValueError, match="the name says shard 0 of 2, its settings file says"):
        merge_tsv(tmp_path / "out.tsv", [tmp_path / "x.shard0of2.tsv"])


# -- case 3: merge never replaces an existing file unasked ---------------------------------------


def test_merge_refuses_an_existing_output(inputs, tmp_path, capsys):
    assert run(certify_argv(inputs, tmp_path / "big.tsv")) == 0
    assert run(certify_argv(inputs, tmp_path / "small.tsv", "--max", "2")) == 0
    before = (tmp_path / "big.tsv").read_bytes()
    err = error_of(capsys, ["merge", tmp_path / "big.tsv", tmp_path / "small.tsv"])
    assert "big.tsv exists" in err and "--overwrite" in err
    assert (tmp_path / "big.tsv").read_bytes() == before
    assert run(["merge", tmp_path / "big.tsv", tmp_path / "small.tsv", "--overwrite"]) == 0
    assert len(read_tsv(tmp_path / "big.tsv")) == 2
    assert read_sidecar(tmp_path / "big.tsv")["settings"]["max"] == 2


# -- case 4: a failed start leaves the old file and blocks no rerun ------------------------------


def test_overwrite_validates_everything_before_touching_the_file(inputs, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    assert run(certify_argv(inputs, out)) == 0
    before, sidecar = out.read_bytes(), sidecar_path(out).read_bytes()
    for bad, message in (
        (["--n", "0"], "--n must be an integer >= 1"),
        (["--alpha", "1.5"], "--alpha must lie in the open interval"),
        (["--max", "0"], "--max must be -1 (no limit)"),
        (["--checkpoint", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (["--data", f"npz:{tmp_path / 'none.npz'}"], "none.npz"),
    ):
        err = error_of(capsys, [*certify_argv(inputs, out, "--overwrite"), *bad])
        assert message in err, (bad, err)
        assert out.read_bytes() == before and sidecar_path(out).read_bytes() == sidecar


def test_a_failed_start_leaves_no_file_behind(inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new.tsv"
    err = error_of(capsys, certify_argv(inputs, out, "--n", "0"))
    assert "--n must be" in err and not out.exists()
    # A failure inside the first certificate (after every check passed): still no file.
    from drs_ext.smoothing import BranchSmoothing

    def broken(*args, **kwargs):
        raise ValueError("the model broke")

    with monkeypatch.context() as patch:
        patch.setattr(BranchSmoothing, "certify_details", broken)
        assert "the model broke" in error_of(capsys, certify_argv(inputs, out))
        assert not out.exists() and not sidecar_path(out).exists()
    # --overwrite of an existing file that fails at the first image keeps the old rows.
    assert run(certify_argv(inputs, tmp_path / "old.tsv", "--max", "2")) == 0
    before = (tmp_path / "old.tsv").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(BranchSmoothing, "certify_details", broken)
        assert run(certify_argv(inputs, tmp_path / "old.tsv", "--overwrite")) == 2
    assert (tmp_path / "old.tsv").read_bytes() == before
    # The corrected rerun needs neither --resume nor --overwrite.
    assert run(certify_argv(inputs, out, "--max", "2")) == 0 and len(read_tsv(out)) == 2


def test_writer_touches_nothing_until_its_first_row(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text(HEADER + "\n0\t1\t1\t0.5\t1\t0:00:01\n")
    writer = TsvWriter(path, overwrite=True, settings=SETTINGS)
    assert path.read_text().count("\n") == 2 and not sidecar_path(path).exists()
    writer.write(3, 1, 1, 0.25, 1, 0.5)
    writer.close()
    assert [r.idx for r in read_tsv(path)] == [3]
    assert read_sidecar(path)["settings"] == SETTINGS
    # A writer closed without rows leaves a valid header-only file (an empty shard).
    with TsvWriter(tmp_path / "empty.tsv"):
        pass
    assert (tmp_path / "empty.tsv").read_text() == HEADER + "\n"
    # Replacing a file without settings removes the sidecar that described the old rows.
    with TsvWriter(path, overwrite=True) as writer:
        writer.write(0, 1, 1, 0.5, 1, 0.1)
    assert not sidecar_path(path).exists()


def test_kill_9_mid_run_resumes_exactly(inputs, tmp_path):
    """A real SIGKILL of `drs certify` mid-run: the file and its sidecar survive, the resume
    passes the settings check and ends with exactly the rows of an uninterrupted run."""
    out = tmp_path / "killed.tsv"
    slow = ["--n", "30000", "--batch", "1000", "--max", "4"]  # rows slow enough to kill between
    argv = certify_argv(inputs, out, *slow)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "drs_ext.cli", *argv], env={**env, "CUDA_VISIBLE_DEVICES": ""}
    )
    deadline = time.monotonic() + 120
    try:
        while not (out.exists() and out.read_text().count("\n") >= 2):
            assert worker.poll() is None, "drs certify ended before it could be killed"
            assert time.monotonic() < deadline, "no row within 120 s"
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert 1 <= len(rows_without_time(out)) < 4 and read_sidecar(out) is not None
    assert run([*argv, "--resume"]) == 0
    assert run(certify_argv(inputs, tmp_path / "whole.tsv", *slow)) == 0
    assert rows_without_time(out) == rows_without_time(tmp_path / "whole.tsv")


def test_a_file_without_finished_rows_takes_the_new_settings(tmp_path):
    path = tmp_path / "r.tsv"
    with TsvWriter(path, settings=SETTINGS):
        pass
    assert path.read_text() == HEADER + "\n" and read_sidecar(path)["settings"] == SETTINGS
    other = {**SETTINGS, "n": 7}
    with TsvWriter(path, resume=True, settings=other) as writer:
        writer.write(0, 1, 1, 0.5, 1, 0.1)
    assert read_sidecar(path)["settings"] == other
    with pytest.raises(ValueError, match="n: 7 \\(the file\\) vs 100 \\(this run\\)"):
        TsvWriter(path, resume=True, settings=SETTINGS)
