"""`drs certify` under torchrun (issue 66, case 5): the documented command launched for real with
two CPU processes, flags that torchrun's own parser would take for its options, and the
RANK / WORLD_SIZE variables checked before anything runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from run_fixtures import make_run_inputs, rows_without_time

from drs_ext import cli
from drs_ext.cli.certify import register
from drs_ext.cli.common import parse_shard
from drs_ext.io.results import read_tsv
from drs_ext.io.settings import read_sidecar

torchrun = pytest.importorskip("torch.distributed.run")


def drs_command() -> list[str]:
    """The installed `drs` (a pyenv shim is fine after --no-python), else the same entry point
    through the interpreter running the tests."""
    found = shutil.which("drs")
    return [found] if found else [sys.executable, "-m", "drs_ext.cli"]


def test_torchrun_no_python_certifies_the_shards_of_a_single_run(tmp_path, monkeypatch):
    """The README's command: torchrun --standalone --nproc_per_node=2 --no-python -- drs
    certify … --n … --max …; its merged shards equal one process's file."""
    inputs = make_run_inputs(tmp_path)
    flags = ["--data", inputs["data"], "--checkpoint", *inputs["drs"], "--n0", "4", "--n", "8"]
    flags += ["--max", "6", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launch += ["--no-python", "--", *drs_command(), "certify", *flags]
    done = subprocess.run(
        [*launch, "--out", str(tmp_path / "tr.tsv")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    shards = [tmp_path / f"tr.shard{k}of2.tsv" for k in range(2)]
    assert [[r.idx for r in read_tsv(s)] for s in shards] == [[0, 2, 4], [1, 3, 5]]
    assert [read_sidecar(s)["settings"]["shard"] for s in shards] == [0, 1]
    assert read_sidecar(shards[0])["settings"]["n"] == 8  # --n reached drs, not torchrun
    with monkeypatch.context() as patch:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            patch.delenv(name, raising=False)
        assert cli.main(["merge", str(tmp_path / "all.tsv"), *map(str, shards)]) == 0
        assert (
            cli.main(["certify", *flags, "--device", "cpu", "--out", str(tmp_path / "one.tsv")])
            == 0
        )
    assert rows_without_time(tmp_path / "all.tsv") == rows_without_time(tmp_path / "one.tsv")


def certify_flags() -> list[list[str]]:
    """The option strings of `drs certify`, grouped per argument."""
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    parser = sub.choices["certify"]
    return [a.option_strings for a in parser._actions if a.option_strings and a.dest != "help"]


def torchrun_takes(flag: str) -> bool:
    """Whether torchrun's parser would read `flag` (after the script) as its own option prefix."""
    options = [o for a in torchrun.get_args_parser()._actions for o in a.option_strings]
    return any(o.startswith(flag) for o in options)


def test_every_certify_flag_has_a_spelling_torchrun_leaves_alone():
    clashes = {}
    for spellings in certify_flags():
        usable = [s for s in spellings if not torchrun_takes(s)]
        assert usable, f"{spellings} all clash with torchrun's options"
        if len(usable) < len(spellings):
            clashes[spellings[0]] = usable
    # What the docs promise for the form torchrun … $(which drs) certify …:
    assert clashes.get("--n") == ["--N", "--num-samples"]
    assert clashes.get("--max") == ["--max-index"]
    parser = torchrun.get_args_parser()
    args = parser.parse_args(
        ["--standalone", "--nproc_per_node=2", "/bin/drs", "certify", "--num-samples", "9"]
        + ["--N0", "5", "--max-index", "40", "--alpha", "0.01", "--out", "x.tsv"]
    )
    assert args.training_script == "/bin/drs" and args.max_restarts == 0
    assert args.training_script_args[:3] == ["certify", "--num-samples", "9"]
    parsed = cli.build_parser().parse_args(
        ["certify", "--data", "d", "--checkpoint", "c"] + args.training_script_args[1:]
    )
    assert (parsed.n, parsed.n0, parsed.max, parsed.alpha) == (9, 5, 40, 0.01)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
        ({"RANK": "5", "WORLD_SIZE": "2"}, r"RANK=5 must lie in \[0, WORLD_SIZE\) = \[0, 2\)"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be an integer >= 1"),
        ({"RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE must be an integer >= 1 .* got 'abc'"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK must be an integer >= 0"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK must be an integer >= 0"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ],
)
def test_bad_torchrun_variables_are_clear_errors(env, message):
    with pytest.raises(ValueError, match=message):
        parse_shard(None, env)


def test_torchrun_variables_and_shard_flag():
    assert parse_shard(None, {}) == (0, 1)
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)
    assert parse_shard(None, {"WORLD_SIZE": "1"}) == (0, 1)
    assert parse_shard("2/4", {"RANK": "1", "WORLD_SIZE": "1"}) == (2, 4)
    with pytest.raises(ValueError, match="--shard 0/2 given under torchrun"):
        parse_shard("0/2", {"RANK": "1", "WORLD_SIZE": "2"})


def test_bad_torchrun_variables_stop_certify_before_any_file(tmp_path, monkeypatch, capsys):
    inputs = make_run_inputs(tmp_path)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["certify", "--data", inputs["data"], "--checkpoint", inputs["rs"]]
    assert cli.main([*argv, "--out", str(tmp_path / "x.tsv")]) == 2
    assert "RANK=5 must lie in" in capsys.readouterr().err
    assert not list(Path(tmp_path).glob("x*"))
